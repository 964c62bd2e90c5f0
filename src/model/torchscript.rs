//! TorchScript models. STUB.
