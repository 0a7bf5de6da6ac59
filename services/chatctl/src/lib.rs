//! Library side of `chatctl`: the local cluster that `chatctl local up`
//! runs and the load tests start and break.

pub mod local;
