"""The wire protocol both sides speak: the ``.proto``, its generated code, chunked transfer, conversions."""
