//! Library side of `chatctl`: the local cluster that `chatctl local up`
//! runs and the load tests start and break.

pub mod backup;
pub mod compose;
pub mod incident;
pub mod local;
pub mod plan;
pub mod rebuild;
pub mod restart;
