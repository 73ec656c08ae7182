//! Elementwise operations (kernels/elementwise.cu): one thread per output element in
//! grid-stride loops over [`elementwise_launch`] grids. `binary` broadcasts like numpy through
//! one kernel that indexes both operands with per-dimension strides (0 along broadcast
//! dimensions), planned with the strided-copy helpers of `layout.rs`.

use dsv4_core::backend::{BinaryOp, UnaryOp};
use dsv4_core::backend_checks as checks;
use dsv4_core::error::Result;

use crate::backend::CudaBackend;
use crate::device::{Device, KernelArg};
use crate::layout::{broadcast_strides, coalesce, contiguous_strides, for_each_launch, strided_args};
use crate::memory::elementwise_launch;
use crate::tensor::CudaTensor;

/// `DSV4_UNARY_*` of elementwise.cu.
fn unary_code(op: UnaryOp) -> i32 {
    match op {
        UnaryOp::Sigmoid => 0,
        UnaryOp::Silu => 1,
        UnaryOp::Softplus => 2,
        UnaryOp::Sqrt => 3,
        UnaryOp::Rsqrt => 4,
        UnaryOp::Exp => 5,
        UnaryOp::Relu => 6,
        UnaryOp::Neg => 7,
        UnaryOp::Square => 8,
    }
}

/// `DSV4_BINARY_*` of elementwise.cu.
fn binary_code(op: BinaryOp) -> i32 {
    match op {
        BinaryOp::Add => 0,
        BinaryOp::Sub => 1,
        BinaryOp::Mul => 2,
        BinaryOp::Div => 3,
        BinaryOp::Max => 4,
        BinaryOp::Min => 5,
    }
}

/// A scalar argument of an elementwise kernel after `(x, out, n)`.
#[derive(Debug, Clone, Copy)]
enum Scalar {
    I32(i32),
    F32(f32),
}

impl<D: Device> CudaBackend<D> {
    /// A new tensor of x's shape written by `kernel(x, out, n, scalars..)`, launched when x has
    /// elements.
    fn map_elements(&self, kernel: &'static str, x: &CudaTensor<D>, scalars: &[Scalar]) -> Result<CudaTensor<D>> {
        let out = self.new_tensor(&x.shape)?;
        let n: usize = x.shape.iter().product();
        if n > 0 {
            let mut args = vec![KernelArg::In(&*x.buf, x.offset), KernelArg::Out(&*out.buf, 0), KernelArg::count(n)];
            args.extend(scalars.iter().map(|s| match *s {
                Scalar::I32(v) => KernelArg::I32(v),
                Scalar::F32(v) => KernelArg::F32(v),
            }));
            self.dev.launch(kernel, elementwise_launch(n), &args)?;
        }
        Ok(out)
    }

    pub(crate) fn unary_op(&self, x: &CudaTensor<D>, op: UnaryOp) -> Result<CudaTensor<D>> {
        checks::unary(Self::NAME, &x.shape)?;
        self.map_elements("dsv4_unary_f32", x, &[Scalar::I32(unary_code(op))])
    }

    pub(crate) fn binary_op(&self, a: &CudaTensor<D>, b: &CudaTensor<D>, op: BinaryOp) -> Result<CudaTensor<D>> {
        let shape = checks::binary(Self::NAME, &a.shape, &b.shape)?;
        let out = self.new_tensor(&shape)?;
        if shape.contains(&0) {
            return Ok(out);
        }
        let (sa, sb, so) =
            (broadcast_strides(&a.shape, &shape), broadcast_strides(&b.shape, &shape), contiguous_strides(&shape));
        let per_dim: Vec<[usize; 3]> = (0..shape.len()).map(|k| [sa[k], sb[k], so[k]]).collect();
        let plan = coalesce(&shape, &per_dim);
        for_each_launch(&plan, |offsets, inner| {
            let mut args = vec![
                KernelArg::In(&*a.buf, a.offset + 4 * offsets[0]),
                KernelArg::In(&*b.buf, b.offset + 4 * offsets[1]),
                KernelArg::Out(&*out.buf, 4 * offsets[2]),
            ];
            // The kernel writes its elements contiguously: the output's own strides are implied.
            args.push(KernelArg::I32(binary_code(op)));
            args.extend(strided_args(inner, 2));
            let count: usize = inner.iter().map(|d| d.0).product();
            self.dev.launch("dsv4_binary_f32", elementwise_launch(count), &args)
        })?;
        Ok(out)
    }

    pub(crate) fn affine_op(&self, x: &CudaTensor<D>, mul: f32, add: f32) -> Result<CudaTensor<D>> {
        checks::affine(Self::NAME, &x.shape)?;
        self.map_elements("dsv4_affine_f32", x, &[Scalar::F32(mul), Scalar::F32(add)])
    }

    pub(crate) fn clamp_op(&self, x: &CudaTensor<D>, min: f32, max: f32) -> Result<CudaTensor<D>> {
        checks::clamp(Self::NAME, &x.shape)?;
        self.map_elements("dsv4_clamp_f32", x, &[Scalar::F32(min), Scalar::F32(max)])
    }

    pub(crate) fn round_to_bf16_op(&self, x: &CudaTensor<D>) -> Result<CudaTensor<D>> {
        checks::unary(Self::NAME, &x.shape)?;
        self.map_elements("dsv4_round_bf16_f32", x, &[])
    }

    pub(crate) fn rope_op(
        &self,
        x: &CudaTensor<D>,
        cos: &CudaTensor<D>,
        sin: &CudaTensor<D>,
        inverse: bool,
    ) -> Result<CudaTensor<D>> {
        let (t, heads, d, half) = checks::rope(Self::NAME, &x.shape, &cos.shape, &sin.shape)?;
        let out = self.new_tensor(&x.shape)?;
        let n = t * heads * d;
        if n > 0 {
            let args = [
                KernelArg::In(&*x.buf, x.offset),
                KernelArg::In(&*cos.buf, cos.offset),
                KernelArg::In(&*sin.buf, sin.offset),
                KernelArg::Out(&*out.buf, 0),
                KernelArg::count(t),
                KernelArg::count(heads),
                KernelArg::count(d),
                KernelArg::count(half),
                KernelArg::I32(inverse as i32),
            ];
            self.dev.launch("dsv4_rope_f32", elementwise_launch(n), &args)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::kernel_define;

    const SOURCE: &str = include_str!("../kernels/elementwise.cu");

    #[test]
    fn operation_codes_match_the_kernels() {
        use UnaryOp::*;
        for op in [Sigmoid, Silu, Softplus, Sqrt, Rsqrt, Exp, Relu, Neg, Square] {
            let name = format!("DSV4_UNARY_{}", format!("{op:?}").to_uppercase());
            assert_eq!(kernel_define(SOURCE, &name), Some(unary_code(op) as i64), "{name}");
        }
        for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max, BinaryOp::Min] {
            let name = format!("DSV4_BINARY_{}", format!("{op:?}").to_uppercase());
            assert_eq!(kernel_define(SOURCE, &name), Some(binary_code(op) as i64), "{name}");
        }
    }

    #[test]
    fn every_kernel_is_defined() {
        let names = crate::kernels::kernel_names(SOURCE);
        for k in [
            "dsv4_fill_f32",
            "dsv4_unary_f32",
            "dsv4_binary_f32",
            "dsv4_affine_f32",
            "dsv4_clamp_f32",
            "dsv4_round_bf16_f32",
            "dsv4_rope_f32",
        ] {
            assert!(names.contains(&k), "{k} missing from elementwise.cu");
        }
    }
}
