//! Compiles every .proto under the workspace's `proto/` with a vendored
//! protoc, so a fresh machine needs no system protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "chat/v1/chat.proto",
        "store/v1/store.proto",
        "store/v1/log.proto",
        "raft/v1/raft.proto",
        "router/v1/router.proto",
        "rollout/v1/rollout.proto",
        "status/v1/status.proto",
    ];
    // SAFETY: build scripts are single-threaded; nothing else reads the
    // environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    let paths: Vec<PathBuf> = files.iter().map(|f| root.join(f)).collect();
    for p in &paths {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("chat_descriptor.bin"))
        .bytes(".chat.store.log.v1.Append.body")
        .codec_path("crate::codec::LeanCodec")
        .compile_protos(&paths, &[root])?;
    Ok(())
}
