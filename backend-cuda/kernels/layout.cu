// Layout kernels (backend-cuda/src/layout.rs): one strided copy of 4-byte values serves
// transpose, narrow and concat (and any i32 index tensor as well as f32 activations).

// Dimensions a dsv4_copy_strided_u32 launch indexes (the host coalesces and loops over the rest).
#define DSV4_COPY_DIMS 6

// For the n = d0·…·d(rank-1) elements of a row-major index space: element i, with multi-index
// (c0, …, c(rank-1)) in the dimensions d0.., is copied from src[Σ ck·ssk] to dst[Σ ck·dsk]
// (element strides). 0 <= rank <= DSV4_COPY_DIMS; rank 0 is one element. Raw bits: no float
// arithmetic, so every value (NaN payloads, subnormals) is copied exactly.
extern "C" __global__ void dsv4_copy_strided_u32(const unsigned int* src, unsigned int* dst, i64 n, int rank,
                                                 i64 d0, i64 d1, i64 d2, i64 d3, i64 d4, i64 d5,
                                                 i64 ss0, i64 ss1, i64 ss2, i64 ss3, i64 ss4, i64 ss5,
                                                 i64 ds0, i64 ds1, i64 ds2, i64 ds3, i64 ds4, i64 ds5) {
    const i64 dims[DSV4_COPY_DIMS] = {d0, d1, d2, d3, d4, d5};
    const i64 ss[DSV4_COPY_DIMS] = {ss0, ss1, ss2, ss3, ss4, ss5};
    const i64 ds[DSV4_COPY_DIMS] = {ds0, ds1, ds2, ds3, ds4, ds5};
    if (rank < 0 || rank > DSV4_COPY_DIMS) return;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 os, od;
        dsv4_strided_offsets(i, rank, dims, ss, ds, &os, &od);
        dst[od] = src[os];
    }
}
