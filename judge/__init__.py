"""MT-bench style LLM-as-a-judge as a service on the job stream: contestants answer through the
gateway with the `openai` SDK, any OpenAI-compatible model judges with FastChat's prompts, and
results are pure functions over the stored judgments. Talks to models only over HTTP: it imports
neither the gateway nor the worker."""
