//! Generated protobuf and gRPC types of the chat backend.
//!
//! Only the edges of each service (its gRPC handlers, transport and storage
//! codecs) use these types; domain types live in the service crates.

pub mod codec;

pub mod chat {
    pub mod v1 {
        tonic::include_proto!("chat.v1");

        /// `Chat/SendStream`'s bounds, shared by the gateway that enforces
        /// them and the client that keeps within them.
        pub mod send_stream {
            /// Sends of one stream that may wait for their acks at once; a
            /// send past it is refused alone (RESOURCE_EXHAUSTED).
            pub const WINDOW: usize = 1_024;
            /// Most sends one frame may carry; a larger frame ends the
            /// stream (INVALID_ARGUMENT).
            pub const MAX_FRAME_SENDS: usize = 1_024;
        }
    }
}

pub mod store {
    pub mod v1 {
        tonic::include_proto!("chat.store.v1");
    }
    pub mod log {
        pub mod v1 {
            tonic::include_proto!("chat.store.log.v1");
        }
    }
}

pub mod raft {
    pub mod v1 {
        tonic::include_proto!("chat.raft.v1");
    }
}

pub mod router {
    pub mod v1 {
        tonic::include_proto!("chat.router.v1");
    }
}

pub mod rollout {
    pub mod v1 {
        tonic::include_proto!("chat.rollout.v1");
    }
}

pub mod status {
    pub mod v1 {
        tonic::include_proto!("chat.status.v1");
    }
}

/// Encoded descriptors of every service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/chat_descriptor.bin"));
