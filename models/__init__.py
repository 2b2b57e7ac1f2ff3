"""What the worker and the trainer share about models, and nothing else imports: chat templates
and prompt rendering (`templates.py`), the default model converted from its GGUF file
(`default_model.py`), and models packed as artifacts (`model_artifacts.py`). Kept out of
`proto/`, so that the bus contract loads no model code by construction."""
