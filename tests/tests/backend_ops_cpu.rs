//! The op-level backend suite (`dsv4_tests::backend_suite`) on the CPU backend: its
//! primitives, pools and fused-op overrides against the host references, and its fused ops
//! against the trait's default compositions.

dsv4_tests::backend_suite!(dsv4_backend_cpu::CpuBackend::new());
