"""Adds an MTP block (`mtp.0.*`) to a synthetic DeepSeek-V4 checkpoint written by
shared/bench/gen_synthetic.py, for benchmarking speculative decoding only (weights copied from the
main model: nothing here is a trained draft model).

usage: python ci/add_mtp.py SRC_DIR DST_DIR [--layer L]   (numpy; never run by CI)

The speculative-decoding bench figures of the README came from:
  python ../shared/bench/gen_synthetic.py /tmp/v4mini mini
  python ci/add_mtp.py /tmp/v4mini /tmp/v4mini-mtp
  target/release/dsv4 bench --model /tmp/v4mini-mtp --speculative-tokens 2 --contexts 512,4096 --decode-steps 32

DST_DIR gets SRC_DIR's files (safetensors shards hard-linked when possible, else copied), a new
shard `model-mtp.safetensors` holding the MTP tensors, `num_nextn_predict_layers: 1` in
config.json and the new tensors in model.safetensors.index.json.

The block follows `expected_mtp_tensors` (core/src/model/loader.rs):
  mtp.0.e_proj.weight/.scale, mtp.0.h_proj.weight/.scale  [D, D] FP8 e4m3 + E8M0 128x128 scales
      (copied from two main layers' `attn.wo_b`, which is [D, G*o_lora_rank]; sliced/tiled if
      that is not [D, D])
  mtp.0.enorm.weight, mtp.0.hnorm.weight                   copies of main-layer norms [D]
  mtp.0.{hc_attn,attn_norm,attn.*,hc_ffn,ffn_norm,ffn.*}    layer L's tensors, minus its
      compressor/indexer (sliding attention) -- L must be score-routed (gate.bias, no tid2eid)
  mtp.0.norm.weight, mtp.0.hc_head_{fn,base,scale}          copies of the top-level ones

Tensors are moved as raw bytes (dtypes F8_E4M3 / F8_E8M0 have no numpy equivalent); numpy is
used only to slice/tile a matrix's bytes.
"""
import json, os, shutil, struct, sys

import numpy as np


def read_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
    return hdr, 8 + n


class Ckpt:
    def __init__(self, d):
        self.dir = d
        idx = os.path.join(d, "model.safetensors.index.json")
        if os.path.exists(idx):
            self.index = json.load(open(idx))
            files = sorted(set(self.index["weight_map"].values()))
        else:
            self.index = None
            files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
        self.where = {}
        for fn in files:
            hdr, base = read_header(os.path.join(d, fn))
            for k, v in hdr.items():
                if k != "__metadata__":
                    self.where[k] = (fn, base, v)

    def meta(self, name):
        _, _, v = self.where[name]
        return v["dtype"], list(v["shape"])

    def raw(self, name):
        fn, base, v = self.where[name]
        a, b = v["data_offsets"]
        with open(os.path.join(self.dir, fn), "rb") as f:
            f.seek(base + a)
            return f.read(b - a)


ITEM = {"F8_E4M3": 1, "F8_E8M0": 1, "U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8}


def fit_2d(raw, dtype, shape, want):
    """Bytes of a [r, c] matrix sliced/tiled to `want` (row-major)."""
    if list(shape) == list(want):
        return raw
    item = ITEM[dtype]
    a = np.frombuffer(raw, dtype=np.uint8).reshape(shape[0], shape[1] * item)
    reps = (-(-want[0] // shape[0]), -(-want[1] // shape[1]))
    a = np.tile(a.reshape(shape[0], shape[1], item), (reps[0], reps[1], 1))[: want[0], : want[1]]
    return np.ascontiguousarray(a).tobytes()


def write_safetensors(path, tensors):
    """tensors: {name: (dtype, shape, bytes)}"""
    hdr, off = {"__metadata__": {"format": "pt"}}, 0
    names = sorted(tensors)
    for k in names:
        dt, sh, b = tensors[k]
        n = ITEM[dt]
        for s in sh:
            n *= s
        assert n == len(b), (k, dt, sh, len(b))
        hdr[k] = {"dtype": dt, "shape": list(sh), "data_offsets": [off, off + len(b)]}
        off += len(b)
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for k in names:
            f.write(tensors[k][2])


def main(src, dst, layer=None):
    cfg = json.load(open(os.path.join(src, "config.json")))
    ck = Ckpt(src)
    if any(k.startswith("mtp.") for k in ck.where):
        sys.exit(f"{src} already holds mtp.* tensors")
    D, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    score = [i for i in range(L) if f"layers.{i}.ffn.gate.bias" in ck.where and f"layers.{i}.ffn.gate.tid2eid" not in ck.where]
    if not score:
        sys.exit("no score-routed main layer to copy")
    if layer is None:
        layer = score[0]
    assert layer in score, f"layer {layer} is not score-routed (candidates {score})"

    out = {}

    def copy(src_name, dst_name):
        dt, sh = ck.meta(src_name)
        out[dst_name] = (dt, sh, ck.raw(src_name))

    # The block: layer `layer` renamed, compressor/indexer dropped (MTP attention is sliding).
    pre = f"layers.{layer}."
    for k in sorted(ck.where):
        if not k.startswith(pre):
            continue
        rest = k[len(pre):]
        if rest.startswith("attn.compressor.") or rest.startswith("attn.indexer."):
            continue
        copy(k, "mtp.0." + rest)

    # e_proj / h_proj: FP8 [D, D] + E8M0 [D/128, D/128], from two layers' wo_b.
    others = [i for i in range(L) if i != layer] or [layer]
    for proj, li in (("e_proj", layer), ("h_proj", others[-1])):
        w, s = f"layers.{li}.attn.wo_b.weight", f"layers.{li}.attn.wo_b.scale"
        wdt, wsh = ck.meta(w)
        sdt, ssh = ck.meta(s)
        assert wdt == "F8_E4M3", wdt
        out[f"mtp.0.{proj}.weight"] = (wdt, [D, D], fit_2d(ck.raw(w), wdt, wsh, [D, D]))
        sw = [-(-D // 128), -(-D // 128)]
        out[f"mtp.0.{proj}.scale"] = (sdt, sw, fit_2d(ck.raw(s), sdt, ssh, sw))

    copy(f"layers.{others[0]}.attn_norm.weight", "mtp.0.enorm.weight")
    copy(f"layers.{others[0]}.ffn_norm.weight", "mtp.0.hnorm.weight")
    copy("norm.weight", "mtp.0.norm.weight")
    for x in ("fn", "base", "scale"):
        copy(f"hc_head_{x}", f"mtp.0.hc_head_{x}")

    os.makedirs(dst, exist_ok=True)
    for fn in os.listdir(src):
        s, d = os.path.join(src, fn), os.path.join(dst, fn)
        if fn in ("config.json", "model.safetensors.index.json") or not os.path.isfile(s):
            continue
        if os.path.exists(d):
            os.remove(d)
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shard = "model-mtp.safetensors"
    write_safetensors(os.path.join(dst, shard), out)

    cfg["num_nextn_predict_layers"] = 1
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=1)
    if ck.index is not None:
        idx = ck.index
        idx["weight_map"].update({k: shard for k in out})
        json.dump(idx, open(os.path.join(dst, "model.safetensors.index.json"), "w"), indent=1)
    else:
        # single-file checkpoint: write an index so both files are found
        only = [f for f in os.listdir(src) if f.endswith(".safetensors")][0]
        wm = {k: only for k in ck.where}
        wm.update({k: shard for k in out})
        json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(dst, "model.safetensors.index.json"), "w"), indent=1)
    nbytes = sum(len(v[2]) for v in out.values())
    print(f"{dst}: {len(out)} mtp tensors ({nbytes / 1e6:.1f} MB) from layer {layer} in {shard}")


if __name__ == "__main__":
    args = sys.argv[1:]
    layer = None
    if "--layer" in args:
        i = args.index("--layer")
        layer = int(args[i + 1])
        del args[i : i + 2]
    main(args[0], args[1], layer)
