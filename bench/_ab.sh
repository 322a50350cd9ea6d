cat > /tmp/ab.py <<'PY'
import sys; sys.path.insert(0, 'bench')
import torch, kernels as kb
from mixkvq_compile.kernels.decode_attention import decode_attention
for b, c in ((8, 32768), (1, 131072), (1, 32768), (32, 8192)):
    st = kb.random_store(kb.CONFIGS['kivi2'], b, c)
    q = torch.randn(b, 32, 1, 128, dtype=torch.float16, device='cuda')
    p = st.layout.flushed_groups(c)
    t = [kb.bench_graph(lambda: decode_attention(q, st, c, packed=p)) for _ in range(3)]
    print(sys.argv[1], f'{b}x{c}', ' '.join(f'{x:.4f}' for x in t), flush=True)
    del st; torch.cuda.empty_cache()
PY
F=mixkvq_compile/kernels/planar_attention.py; cp $F /tmp/pa_keep.py
python3 /tmp/ab.py zero16
sed -i 's/sz = tl.zeros(\[BLOCK_M, 16\], tl.float32)/sz = tl.zeros([BLOCK_M, G], tl.float32)/; s/tl.broadcast_to(kz\[:, None\], (FW, 16))/tl.broadcast_to(kz[:, None], (FW, G))/; s/return s \* 16777216.0 + tl.max(sz, 1)\[:, None\]/return s * 16777216.0 + sz/' $F
grep -n "sz" $F
python3 /tmp/ab.py zeroG
cp /tmp/pa_keep.py $F
python3 /tmp/ab.py zero16
