//! Generates the gRPC code from proto/dr.proto with protox (pure Rust), so no
//! protoc is needed on the build machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/dr.proto");
    let fds = protox::compile(["proto/dr.proto"], ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
