"""The bus contract: subject names, streams, consumers, the registry bucket, message models,
and the NATS connection helper with its embedded server. Nothing outside this package spells a
subject or builds a message by hand."""
