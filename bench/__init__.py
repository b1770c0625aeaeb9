"""The benchmark harness: workflow-bff beside nginx, bare relays and a direct connection (`make bench`)."""
