//! Generates the CRI client (the kubelet's side) and containerd's snapshots
//! client from vendored protos with protox, so no protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/cri/v1.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
