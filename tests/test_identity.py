"""library.models.identity: ArcFace loaders on networks the tests build, and alignment on a real photo."""
import os
import warnings

import cv2
import numpy as np
import pytest
import torch

from library.models.identity import (ARCFACE_TEMPLATE_112, ArcFace, IdentityEncoder, align_faces, estimate_similarity,
                              iresnet_config, load_arcface)
from library.models.iresnet import IBasicBlock, IResNet, iresnet50, iresnet100


def _small_iresnet(seed=0):
    """An arcface_torch iresnet with one block per layer, narrow, random weights and BN statistics."""
    torch.manual_seed(seed)
    net = IResNet(IBasicBlock, [1, 1, 1, 1], width=16)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
            elif isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight)
    return net.eval()


def _export(net, path):
    with warnings.catch_warnings():  # the legacy (TorchScript) exporter warns that it is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        _export_legacy(net, path)


def _export_legacy(net, path):
    torch.onnx.export(net, (torch.randn(2, 3, 112, 112),), str(path), do_constant_folding=False, opset_version=17,
                      dynamo=False, input_names=["input.1"], output_names=["embedding"],
                      dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("arcface")
    net = _small_iresnet()
    torch.save(net.state_dict(), d / "backbone.pth")
    _export(net, d / "w600k_tiny.onnx")
    return net, d


def _input(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 112, 112, generator=g) * 2 - 1


# --------------------------------------------------------------------------------------------- loaders
def test_iresnet_layout_and_depth_inference(monkeypatch):
    # shapes only: build on the meta device; normal_ on meta goes through slow Python decompositions
    monkeypatch.setattr(torch.nn.init, "normal_", lambda tensor, *args, **kwargs: tensor)
    for make, layers, params in ((iresnet50, [3, 4, 14, 3], 43_590_848), (iresnet100, [3, 13, 30, 3], 65_156_160)):
        with torch.device("meta"):
            net = make()
        sd = net.state_dict()
        assert iresnet_config(sd) == {"layers": layers, "width": 64, "num_features": 512}
        assert sum(p.numel() for p in net.parameters()) == params  # arcface_torch's r50 43.6M, r100 65.2M
        for key in ("conv1.weight", "bn1.running_var", "prelu.weight", "layer1.0.downsample.0.weight",
                    "layer1.0.downsample.1.weight", "layer2.1.bn3.bias", "layer3.13.prelu.weight", "bn2.weight",
                    "fc.weight", "fc.bias", "features.weight", "features.running_mean"):
            assert key in sd, key
        assert "dropout" not in "".join(sd)


def test_load_pth_matches_and_passes_gradient(files):
    net, d = files
    model = load_arcface(d / "backbone.pth")
    assert isinstance(model, ArcFace)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    model.train()  # a parent's .train() must not switch BatchNorm to batch statistics
    assert not model.training
    x = _input().requires_grad_(True)
    out = model(x)
    with torch.no_grad():
        ref = net(x)
    assert out.shape == (2, 512)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    out.pow(2).sum().backward()
    assert x.grad.abs().sum() > 0


def test_load_pth_wrapped_and_dataparallel_keys(files, tmp_path):
    net, _ = files
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, tmp_path / "b.pt")
    x = _input(1)
    with torch.no_grad():
        assert torch.allclose(load_arcface(tmp_path / "b.pt")(x), net(x), atol=1e-5)


def test_load_onnx_matches_ort_and_torch(files):
    import onnxruntime as ort

    net, d = files
    model = load_arcface(d / "w600k_tiny.onnx")
    assert not any(p.requires_grad for p in model.parameters())
    x = _input(3, seed=5).requires_grad_(True)
    out = model(x)
    sess = ort.InferenceSession(str(d / "w600k_tiny.onnx"), providers=["CPUExecutionProvider"])
    ref_ort = torch.from_numpy(sess.run(None, {"input.1": x.detach().numpy()})[0])
    with torch.no_grad():
        ref = net(x)
    tol = 1e-4 * ref.abs().max().item()
    assert (out.detach() - ref_ort).abs().max().item() < tol
    assert (out.detach() - ref).abs().max().item() < tol
    out.pow(2).sum().backward()
    assert x.grad.abs().sum() > 0


def test_load_onnx_with_normalisation_inside(tmp_path):
    """Old mxnet-converted packs normalise inside the graph and take [0, 255]: the wrapper maps [-1, 1] there."""
    import onnx

    net = _small_iresnet(seed=3)

    class Raw(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net((x - 127.5) * 0.0078125)

    _export(Raw().eval(), tmp_path / "raw.onnx")
    model = onnx.load(str(tmp_path / "raw.onnx"))
    for node in model.graph.node[:8]:  # name the nodes as mxnet's converter did
        if node.op_type in ("Sub", "Mul"):
            node.name = {"Sub": "_minus0", "Mul": "_mul0"}[node.op_type]
    onnx.save(model, str(tmp_path / "raw.onnx"))
    x = _input(2)
    with torch.no_grad():
        # insightface feeds such a pack 255 * RGB: [-1, 1] -> 127.5 x + 127.5, then (v - 127.5) / 128 inside
        assert torch.allclose(load_arcface(tmp_path / "raw.onnx")(x), net(x * 127.5 / 128), atol=1e-4)


def test_load_errors(tmp_path, files, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        load_arcface(tmp_path / "missing.onnx")
    for name in ("bad.onnx", "bad.pth", "bad.bin"):
        (tmp_path / name).write_text("not a model\n")
        with pytest.raises(ValueError, match=name) as e:
            load_arcface(tmp_path / name)
        assert "\n" not in str(e.value)
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth"):
        load_arcface(tmp_path / "other.pth")
    # a conversion that disagrees with onnxruntime is refused
    import onnx2torch

    real = onnx2torch.convert

    def wrong(model):
        m = real(model)
        return torch.nn.Sequential(m, torch.nn.Hardtanh(-0.1, 0.1))

    monkeypatch.setattr(onnx2torch, "convert", wrong)
    with pytest.raises(ValueError, match="differs from onnxruntime"):
        load_arcface(files[1] / "w600k_tiny.onnx")


# ------------------------------------------------------------------------------------------- alignment
def test_estimate_similarity_matches_skimage():
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(0)
    dst = ARCFACE_TEMPLATE_112.numpy()
    srcs = []
    for angle in (0.3, -2.5, 3.0):  # includes rotations past 90 degrees
        c, s = 1.7 * np.cos(angle), 1.7 * np.sin(angle)
        src = dst @ np.array([[c, s], [-s, c]]) + rng.uniform(-50, 200, 2)
        srcs.append(src + rng.normal(0, 2.0, src.shape))  # not an exact similarity: least squares
    srcs = np.stack(srcs).astype(np.float32)
    m = estimate_similarity(torch.from_numpy(srcs), ARCFACE_TEMPLATE_112)
    assert m.shape == (3, 2, 3) and m.dtype == torch.float32
    for i in range(3):
        ref = SimilarityTransform.from_estimate(srcs[i].astype(np.float64), dst.astype(np.float64)).params[:2]
        assert np.allclose(m[i].numpy(), ref, atol=1e-4)


def _tom_hanks():
    import insightface

    path = os.path.join(os.path.dirname(insightface.__file__), "data", "images", "Tom_Hanks_54745.png")
    img = cv2.imread(path)
    assert img is not None and img.shape == (112, 112, 3)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def _similarity(scale, degrees, tx, ty):
    th = np.deg2rad(degrees)
    return np.array([[scale * np.cos(th), -scale * np.sin(th), tx], [scale * np.sin(th), scale * np.cos(th), ty]],
                    dtype=np.float64)


@pytest.fixture(scope="module")
def canvases():
    """The aligned 112 crop placed in a 300x360 canvas by two known similarities, with landmarks."""
    crop = _tom_hanks()
    mats = [_similarity(1.7, 20, 100, 20), _similarity(1.4, -35, 40, 120)]
    imgs = [cv2.warpAffine(crop, m, (360, 300), flags=cv2.INTER_LINEAR) for m in mats]
    lmks = [ARCFACE_TEMPLATE_112.numpy() @ m[:, :2].T + m[:, 2] for m in mats]
    return crop, np.stack(imgs), np.stack(lmks).astype(np.float32)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # skimage's SimilarityTransform.estimate, in insightface
def test_align_faces_recovers_crop_and_matches_insightface(canvases):
    from insightface.utils import face_align

    crop, imgs, lmks = canvases
    images = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    out = align_faces(images, torch.from_numpy(lmks))
    assert out.shape == (2, 3, 112, 112)
    got = out.permute(0, 2, 3, 1).numpy()
    for i in range(2):
        err = np.abs(got[i] - crop)
        assert err.mean() < 0.01, err.mean()                 # in [0, 1] units: resampled twice
        assert err[4:-4, 4:-4].max() < 0.25
        m = face_align.estimate_norm(lmks[i], 112)
        assert np.allclose(estimate_similarity(torch.from_numpy(lmks[i:i + 1]), ARCFACE_TEMPLATE_112)[0].numpy(),
                           m, atol=1e-4)
        ref = cv2.warpAffine(imgs[i], m, (112, 112), borderValue=0.0)  # what norm_crop does
        diff = np.abs(got[i] - ref)
        assert diff.mean() < 1e-3 and diff.max() < 0.02, (diff.mean(), diff.max())
    # other crop sizes scale the template, as estimate_norm does for multiples of 112
    out224 = align_faces(images[:1], torch.from_numpy(lmks[:1]), size=224)[0].permute(1, 2, 0).numpy()
    ref224 = cv2.warpAffine(imgs[0], face_align.estimate_norm(lmks[0], 224), (224, 224), borderValue=0.0)
    assert np.abs(out224 - ref224).mean() < 1e-3


def test_align_faces_gradient_and_identity_encoder(canvases, files):
    crop, imgs, lmks = canvases
    images = (torch.from_numpy(imgs).permute(0, 3, 1, 2) * 2 - 1).requires_grad_(True)
    lm = torch.from_numpy(lmks)
    enc = IdentityEncoder(load_arcface(files[1] / "backbone.pth"))
    enc.train()
    assert not enc.training
    emb = enc(images, lm)
    assert emb.shape == (2, 512)
    # independently: insightface's crop (cv2.warpAffine with estimate_norm), then the network that was saved
    from insightface.utils import face_align

    crops = np.stack([cv2.warpAffine(imgs[i], face_align.estimate_norm(lmks[i], 112), (112, 112), borderValue=0.0)
                      for i in range(2)])
    with torch.no_grad():
        want = files[0](torch.from_numpy(crops).permute(0, 3, 1, 2) * 2 - 1)
    cos = torch.nn.functional.cosine_similarity(emb.detach(), want, dim=-1)
    assert (cos > 0.999).all(), cos
    torch.testing.assert_close(emb.detach(), want, rtol=0, atol=0.02 * want.abs().max().item())
    emb.pow(2).sum().backward()
    g = images.grad
    assert g.abs().sum() > 0
    # gradient only where the crop samples from: the canvas corner far from the face gets none
    assert g[0, :, 280:, :20].abs().sum() == 0
