//! `vrdma-node`: one guest with a vrdma device behind a RoCEv2 gateway, in its own process,
//! driven by JSON lines on stdin (see `vrdma_tests::node`).

fn main() {
    vrdma_tests::node::serve();
}
