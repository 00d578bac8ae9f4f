# Session 24 experiment (issue #35), kept for the record: paths are this machine's (/work/...); one thread each.
"""Does a blind-spot score corrected for the noise's covariance rank ACsN's fine-tuned models right?

Under noise correlated between pixels, E[(f_i - y_i)^2] = E[(f_i - s_i)^2] + var(n_i) - 2 Cov(f_i, n_i): a model that
copies its neighbours' noise (f_i depends on n_j, which correlates with n_i) scores better than it is. To first order
Cov(f_i, n_i) = sum_j J_ij Cov(x~_j, n_i) (J: the Jacobian at the blinded input x~), so the corrected score is the
plain one + 2 tr(M J K) / |M|, estimated with Rademacher probes z: (M z) . J (K z), a Jacobian-vector product. K from
the excess correlation of the starting model's residual (9 x 9 lags, as the noise check's) and its local strength.

python covariance_corrected_score.py PART NPARTS MODEL.safetensors ...   # prints one JSON line per model
"""

import json
import sys

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from torch.func import jvp

import memnet
from memnet.evaluate import percentile_normalize, predictor
from memnet.finetune import _local_sd
from memnet.metrics import affine_fit, psnr

torch.set_num_threads(1)
D = "/work/shared/data/microscopy_ood/"
R, CROP, FRACTION, DRAWS, PROBES = 4, 256, 0.03, 2, 4
x = tifffile.imread(D + "noisy/acsn_bs21.tif").astype(np.float64)
clean = tifffile.imread(D + "clean/acsn_bs21.tif").astype(np.float64)
xn = percentile_normalize(x).astype(np.float32)
start, _ = memnet.load_model("microscopy")
start.eval()


def lag_corr(r, dy, dx):
    h, w = r.shape
    a = r[max(0, -dy): h - max(0, dy), max(0, -dx): w - max(0, dx)]
    b = r[max(0, dy): max(0, dy) + a.shape[0], max(0, dx): max(0, dx) + a.shape[1]]
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean()))


out0 = predictor(start)(xn)
res = xn - out0
rng = np.random.default_rng(0)
white = (out0 + _local_sd(res) * rng.standard_normal(res.shape)).astype(np.float32)
res_w = white - predictor(start)(white)
rho = np.zeros((2 * R + 1, 2 * R + 1), np.float32)
for dy in range(-R, R + 1):
    for dx in range(-R, R + 1):
        if (dy, dx) != (0, 0):
            rho[dy + R, dx + R] = lag_corr(res, dy, dx) - lag_corr(res_w, dy, dx)
sd = torch.from_numpy(_local_sd(res).astype(np.float32))
kernel = torch.from_numpy(rho)[None, None]
h, w = xn.shape
corners = [(y0, x0) for y0 in np.linspace(0, h - CROP, 4).astype(int) for x0 in (0, w - CROP)]


def scores(model):
    g = np.random.default_rng(1)  # the same masks and probes for every model
    plain, corr = [], []
    for y0, x0 in corners:
        xc = torch.from_numpy(xn[y0: y0 + CROP, x0: x0 + CROP])[None, None]
        s = sd[y0: y0 + CROP, x0: x0 + CROP][None, None]
        for _ in range(DRAWS):
            n = int(FRACTION * CROP * CROP)
            ys, xs = g.integers(0, CROP, n), g.integers(0, CROP, n)
            oy, ox = g.integers(-2, 3, n), g.integers(-2, 3, n)
            ox[(oy == 0) & (ox == 0)] = 1
            sy, sx = np.clip(ys + oy, 0, CROP - 1), np.clip(xs + ox, 0, CROP - 1)
            xt = xc.clone()
            xt[0, 0, ys, xs] = xc[0, 0, sy, sx]
            src_y, src_x = np.mgrid[0:CROP, 0:CROP]
            src_y[ys, xs], src_x[ys, xs] = sy, sx  # pi(j): whose noise sits at j in the blinded input
            with torch.no_grad():
                f = model(xt)
            plain.append(float(((f[0, 0, ys, xs] - xc[0, 0, ys, xs]) ** 2).mean()))
            c = 0.0
            for _ in range(PROBES):
                z = torch.from_numpy(g.choice([-1.0, 1.0], (1, 1, CROP, CROP)).astype(np.float32))
                v = s * F.conv2d(s * z, kernel.flip(-1, -2), padding=R)  # (C z) at every pixel
                kz = v[0, 0, src_y, src_x][None, None]  # (K z)_j = (C z)_{pi(j)}
                _, jk = jvp(lambda inp: model(inp), (xt,), (kz,))
                c += float((z[0, 0, ys, xs] * jk[0, 0, ys, xs]).mean()) / PROBES
            corr.append(c)
    return float(np.mean(plain)), float(np.mean(plain) + 2 * np.mean(corr))


if __name__ == "__main__":
    part, nparts = int(sys.argv[1]), int(sys.argv[2])
    p0 = psnr(affine_fit(out0, clean), clean)
    if part == 0:
        print(json.dumps({"model": "start", "real": 0.0, "kernel_lag1": [float(rho[R - 1, R]), float(rho[R, R - 1])],
                          "scores": scores(start)}), flush=True)
    for path in sys.argv[3:][part::nparts]:
        m, _ = memnet.load_model(path)
        m.eval()
        real = psnr(affine_fit(predictor(m)(xn), clean), clean) - p0
        print(json.dumps({"model": path, "real": round(real, 3), "scores": scores(m)}), flush=True)
