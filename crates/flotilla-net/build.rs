//! Generates the gRPC service stubs of `flotilla.v1.Coordinator` from Rust descriptions, so
//! the build needs no `protoc`. The messages are prost types in `src/proto.rs`; the schema
//! they implement is documented in `proto/flotilla.proto` at the repository root.

fn main() {
    let method = |name: &str, route: &str, input: &str, output: &str| {
        tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("crate::proto::{input}"))
            .output_type(format!("crate::proto::{output}"))
            .codec_path("tonic_prost::ProstCodec")
            .build()
    };
    let service = tonic_build::manual::Service::builder()
        .name("Coordinator")
        .package("flotilla.v1")
        .method(method(
            "describe",
            "Describe",
            "DescribeRequest",
            "DescribeReply",
        ))
        .method(method("join", "Join", "JoinRequest", "JoinReply"))
        .method(method("pull", "Pull", "PullRequest", "PullReply"))
        .method(method("push", "Push", "PushRequest", "PushReply"))
        .method(method(
            "heartbeat",
            "Heartbeat",
            "HeartbeatRequest",
            "HeartbeatReply",
        ))
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
}
