"""Running the fabric: the `chatfabric` command line and the all-in-one local launcher (`up`)."""
