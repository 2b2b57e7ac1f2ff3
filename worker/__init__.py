"""Model workers: pull requests for a model from JetStream, run a backend, stream chunks back,
and keep a card in the registry. Backends (`backend.Backend`) know nothing of NATS."""
