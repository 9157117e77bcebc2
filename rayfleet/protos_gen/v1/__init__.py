"""Stubs of ``protos/rayfleet/v1`` (proto package ``rayfleet.v1``)."""
