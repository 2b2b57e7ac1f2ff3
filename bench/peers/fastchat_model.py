"""Write the default model as a folder that FastChat 0.2.36 (transformers 4.x) loads correctly.

The folder transformers 5.x writes needs four changes for 4.x: a top-level `rope_theta` (4.x
ignores `rope_parameters` and would silently use 10000) and `rope_scaling: null` in config.json;
in tokenizer_config.json the class `PreTrainedTokenizerFast`, the chat template inline, and
`model_input_names`.

    python bench/peers/fastchat_model.py OUT_DIR
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from chatfabric.models.default_model import ensure_default_model


def main(out: Path) -> None:
    source = ensure_default_model()
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(source, out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", 100000.0)
    config["rope_scaling"] = None
    config_path.write_text(json.dumps(config, indent=2))
    tok_path = out / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok["chat_template"] = (out / "chat_template.jinja").read_text()
    tok["model_input_names"] = ["input_ids", "attention_mask"]
    tok_path.write_text(json.dumps(tok, indent=2))
    print(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
