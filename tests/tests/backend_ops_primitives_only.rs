//! The op-level backend suite on `PrimitivesOnly<CpuBackend>`: the CPU primitives with every
//! fused op taken from the trait's default composition, which is what a new backend inherits.

dsv4_tests::backend_suite!(dsv4_tests::primitives_only::PrimitivesOnly(dsv4_backend_cpu::CpuBackend::new()));
