"""`chatfabric bench`: a serving benchmark for any OpenAI-compatible endpoint (chatfabric,
`vllm serve`, FastChat): load shapes, prompt sets, latency and throughput metrics."""
