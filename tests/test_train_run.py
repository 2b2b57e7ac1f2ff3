"""Tiny real training runs on SmolLM2 (CPU): SFT with LoRA overfits a batch, DPO widens the
chosen-minus-rejected margin, a DPO run stopped at a checkpoint and resumed ends exactly where an
uninterrupted one does, DeepSpeed ZeRO-2 and ZeRO-3 train, stop and resume on the CPU, QLoRA
is refused on a CPU, arena votes become pairs."""

from __future__ import annotations

import json
import threading

import pytest

from chatfabric.proto.events import ConversationLog, Vote
from chatfabric.proto.messages import ChatMessage
from chatfabric.trainer.dpo import run_dpo
from chatfabric.trainer.pairs import arena_pairs
from chatfabric.trainer.progress import Hooks, Stopped
from chatfabric.trainer.settings import TrainSettings
from chatfabric.trainer.sft import RunSpec, check_device, run_sft
from shared_data import SHAREGPT_FILE, shared_file

SHAREGPT = str(shared_file(SHAREGPT_FILE))


def tiny_data(path, n=2):
    records = json.load(open(SHAREGPT))[:n]
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def test_lora_sft_loss_decreases_and_saves_an_adapter(model_dir, tmp_path):
    seen = []
    settings = TrainSettings(method="lora", max_length=64, max_steps=3, lr=2e-3, batch_size=2, save_steps=100)
    result = run_sft(RunSpec(model_dir, tiny_data(tmp_path / "d.jsonl"), tmp_path / "out", settings),
                     Hooks(on_progress=seen.append))
    assert result.metrics["steps"] == 3
    assert result.metrics["last_loss"] < result.metrics["first_loss"]
    assert (result.folder / "adapter_model.safetensors").is_file()
    assert [p.step for p in seen if p.loss is not None] == [1, 2, 3]
    assert all(p.tokens_per_s > 0 and p.lr is not None for p in seen if p.loss is not None)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_trains_stops_and_resumes_on_the_cpu(model_dir, tmp_path, monkeypatch, stage):
    """The shipped ZeRO configs through the Trainer integration, on DeepSpeed's CPU accelerator,
    in one process with no launcher (the run makes itself a process group of one)."""
    from safetensors.torch import load_file

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so that the group's variables the run sets are removed after it
        monkeypatch.delenv(name)
    settings = TrainSettings(method="lora", max_length=64, max_steps=3, lr=2e-3, batch_size=2, save_steps=100,
                             deepspeed=stage)
    spec = RunSpec(model_dir, tiny_data(tmp_path / "d.jsonl"), tmp_path / "out", settings)
    saved = []
    hooks = Hooks(on_checkpoint=lambda folder, step: saved.append(sorted(p.name for p in folder.iterdir())))
    hooks.on_progress = lambda progress: progress.loss is not None and hooks.stop.set()  # stops after the next step
    with pytest.raises(Stopped, match="stopped at step 2 of 3"):
        run_sft(spec, hooks)
    assert len(saved) == 1 and "global_step2" in saved[0]  # DeepSpeed's own engine state, beside the adapter
    steps = []
    result = run_sft(RunSpec(model_dir, spec.data, spec.output, settings, resume=True),
                     Hooks(on_progress=lambda progress: progress.loss is not None and steps.append(progress.step)))
    assert result.metrics["steps"] == 3 and steps == [3]  # only the step after the checkpoint ran again
    weights = load_file(str(result.folder / "adapter_model.safetensors"))
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in weights.items())  # B starts at 0
    # the next run in this process (a trainer service's next job) is a plain one, unpartitioned
    plain = TrainSettings(method="lora", max_length=64, max_steps=1, batch_size=2, save_steps=100)
    assert run_sft(RunSpec(model_dir, spec.data, tmp_path / "plain", plain), Hooks()).metrics["steps"] == 1


def test_qlora_is_refused_on_a_cpu():
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        check_device(TrainSettings(method="lora", qlora=True))


def tiny_pairs(path):
    path.write_text("\n".join(json.dumps(p) for p in [
        {"prompt": "Say yes.", "chosen": "Yes.", "rejected": "No way."},
        {"prompt": [{"role": "user", "content": "Colour of the sky?"}], "chosen": "Blue.", "rejected": "Green."},
        {"prompt": "Two plus two?", "chosen": "Four.", "rejected": "Five."}]))
    return path


def test_dpo_widens_the_margin(model_dir, tmp_path):
    settings = TrainSettings(method="dpo", max_length=64, max_steps=3, lr=5e-3, batch_size=2)
    result = run_dpo(RunSpec(model_dir, tiny_pairs(tmp_path / "pairs.jsonl"), tmp_path / "out", settings),
                     Hooks(stop=threading.Event()))
    assert result.metrics["first_margin"] == pytest.approx(0.0, abs=1e-4)  # the adapter starts as a no-op
    assert result.metrics["last_margin"] > result.metrics["first_margin"]


def test_dpo_stopped_and_resumed_ends_where_an_uninterrupted_run_does(model_dir, tmp_path):
    pairs = tiny_pairs(tmp_path / "pairs.jsonl")
    settings = TrainSettings(method="dpo", max_length=64, max_steps=4, lr=5e-3, batch_size=2, save_steps=100)
    whole = run_dpo(RunSpec(model_dir, pairs, tmp_path / "whole", settings), Hooks())

    checkpoints = []
    hooks = Hooks(on_checkpoint=lambda folder, step: checkpoints.append((folder.name, step)))
    hooks.on_progress = lambda progress: progress.step == 2 and hooks.stop.set()
    with pytest.raises(Stopped, match="stopped at step 2 of 4"):
        run_dpo(RunSpec(model_dir, pairs, tmp_path / "parts", settings), hooks)
    assert checkpoints == [("checkpoint-2", 2)]
    steps = []
    resumed = run_dpo(RunSpec(model_dir, pairs, tmp_path / "parts", settings, resume=True),
                      Hooks(on_progress=lambda progress: steps.append(progress.step)))
    assert steps == [3, 4]
    assert resumed.metrics == pytest.approx(whole.metrics, abs=1e-5)  # same curve, same end
    with pytest.raises(ValueError, match="no checkpoint"):
        run_dpo(RunSpec(model_dir, pairs, tmp_path / "nothing", settings, resume=True), Hooks())


def conv(cid, model, answer, question="Q?"):
    return ConversationLog(id=cid, model=model, messages=(ChatMessage(role="user", content=question),
                                                          ChatMessage(role="assistant", content=answer)))


def test_arena_votes_become_deduplicated_pairs():
    logs = {c.id: c for c in [conv("a1", "m1", "good"), conv("b1", "m2", "bad"), conv("a2", "m1", "x"),
                              conv("b2", "m2", "y"), conv("a3", "m1", "p", "other?"), conv("b3", "m2", "q")]}
    vote = lambda w, a, b, anon=True: Vote(winner=w, model_a="m1", model_b="m2", anonymous=anon,  # noqa: E731
                                           conversation_a=a, conversation_b=b)
    votes = [vote("model_a", "a1", "b1"), vote("model_a", "a1", "b1"), vote("tie", "a2", "b2"),
             vote("tie (bothbad)", "a2", "b2"), vote("model_b", "a2", "b2", anon=False),
             vote("model_b", "a3", "b3"), vote("model_a", "a1", "missing")]
    pairs = arena_pairs(votes, logs)
    assert [(p.prompt[0].content, p.chosen, p.rejected) for p in pairs] == [("Q?", "good", "bad")]
    assert len(arena_pairs(votes, logs, anonymous_only=False)) == 2
