//! Weight matrices and the linear layer.
