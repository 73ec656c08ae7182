//! Re-export: the wrapper lives in `dsv4_core::primitives_only`, where backend crates can use it too.

pub use dsv4_core::primitives_only::PrimitivesOnly;
