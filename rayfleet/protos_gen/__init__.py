"""Generated gRPC stubs (do not edit; regenerate with ``python -m rayfleet.cluster.protos``)."""
