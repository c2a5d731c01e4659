"""make weights: the list of weight files and how they are fetched."""
from local_http import LocalServer


def test_weights_list_names_the_published_files_and_digests():
    """The hub's VD folders hold .bin files (no .safetensors); the iCNN archives are the lab's current
    figshare ids with their md5s; torchvision files carry their sha256 prefix; the VD reference .pth its
    published size and sha256 prefix."""
    from models import weights

    groups = weights.groups()
    assert set(groups) == {"vdvae", "clip", "versatile", "eval", "icnn", "vd_reference"}
    assert groups["vdvae"][0].key == "vdvae/imagenet64-iter-1600000-model-ema.th"
    keys = {f.key: f for f in groups["versatile"]}
    for part in ("vae", "image_unet", "text_unet"):
        f = keys[f"versatile-diffusion/{part}/diffusion_pytorch_model.bin"]
        assert f.url == f"https://huggingface.co/shi-labs/versatile-diffusion/resolve/main/{part}/diffusion_pytorch_model.bin"
    assert not any(k.endswith(".safetensors") for k in keys)
    icnn = {f.key: f for f in groups["icnn"]}
    vgg = icnn["icnn/VGG_ILSVRC_19_layers.zip"]
    gen = icnn["icnn/bvlc_reference_caffenet_generator_ILSVRC2012_Training.zip"]
    assert vgg.url.endswith("/files/38225868") and vgg.md5 == "49f4d6dbf1024f33149352dfd309dc4d"
    assert gen.url.endswith("/files/38361230") and gen.md5 == "bf9d4de43782cb019de733ed7cf84926"
    from pipeline.config import ICNNConfig

    d = ICNNConfig()  # unpacked exactly where the [icnn] defaults look
    assert {k for _, k in vgg.unpack + gen.unpack} == {d.vgg19, d.generator, d.generator_bound}
    ev = {f.key: f for f in groups["eval"]}
    assert ev["alexnet-owt-7be5be79.pth"].sha256 == "7be5be79"
    assert ev["inception_v3_google-0cc3c7bd.pth"].sha256 == "0cc3c7bd"
    assert ev["efficientnet_b1_rwightman-bac287d4.pth"].sha256 == "bac287d4"
    ref = groups["vd_reference"][0]
    assert ref.key.endswith("vd-four-flow-v1-0-fp16-deprecated.pth")
    assert ref.size == 6_664_692_139 and ref.sha256 == "b7814655"


class _Files(LocalServer):
    """A local HTTP server on 127.0.0.1 serving ``files`` (path → bytes) with Range support; HEAD is
    refused (405, as figshare's presigned redirects do) unless ``head_ok``. Every request is recorded."""

    def __init__(self, files, head_ok=False):
        from http.server import BaseHTTPRequestHandler

        self.files, self.requests = files, []
        srv = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_HEAD(self):
                srv.requests.append(("HEAD", self.path, None))
                if not head_ok:
                    self.send_response(405)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(srv.files[self.path])))
                self.end_headers()

            def do_GET(self):
                rng = self.headers.get("Range")
                srv.requests.append(("GET", self.path, rng))
                data = srv.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if rng:
                    a, _, b = rng.removeprefix("bytes=").partition("-")
                    a, b = int(a), int(b) if b else len(data) - 1
                    body = data[a:b + 1]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {a}-{a + len(body) - 1}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(H)


def _zip(members: dict) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _local(groups, url):
    """The same files with their host replaced by the local server (path = the published URL's path)."""
    from dataclasses import replace
    from urllib.parse import urlsplit

    return [replace(f, url=url + urlsplit(f.url).path) for f in groups]


def test_icnn_archives_download_verify_md5_and_unpack_into_the_default_layout(tmp_path, monkeypatch):
    import hashlib
    from dataclasses import replace

    from models import weights
    from pipeline.config import ICNNConfig
    from pipeline.http import download

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    vgg_zip = _zip({"VGG_ILSVRC_19_layers/VGG_ILSVRC_19_layers.pt": b"vgg-weights"})
    gen_zip = _zip({"bvlc_reference_caffenet_generator_ILSVRC2012_Training/generator_relu7.pt": b"gen-weights",
                    "bvlc_reference_caffenet_generator_ILSVRC2012_Training/act_range/3x/relu7.txt": b"1 2 3",
                    "bvlc_reference_caffenet_generator_ILSVRC2012_Training/act_range/3x/fc6.txt": b"x"})
    srv = _Files({"/ndownloader/files/38225868": vgg_zip, "/ndownloader/files/38361230": gen_zip})
    try:
        files = [replace(f, md5=hashlib.md5(data).hexdigest())  # the published md5s belong to the real archives
                 for f, data in zip(_local(weights.groups()["icnn"], srv.url), (vgg_zip, gen_zip))]
        status = download(files, tmp_path, progress=False)
        assert set(status.values()) == {"downloaded"}
        d = ICNNConfig()
        assert (tmp_path / d.vgg19).read_bytes() == b"vgg-weights"
        assert (tmp_path / d.generator).read_bytes() == b"gen-weights"
        assert (tmp_path / d.generator_bound).read_bytes() == b"1 2 3"
        # HEAD is refused, so each size came from a one-byte ranged GET
        assert [r for r in srv.requests if r[0] == "GET" and r[2] == "bytes=0-0"] and \
            sum(r[0] == "HEAD" for r in srv.requests) == 2
        assert not list(tmp_path.rglob("*.part"))
    finally:
        srv.close()


def test_digest_mismatch_is_one_line_and_the_file_is_not_kept(tmp_path, monkeypatch, capsys):
    from models import weights

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    srv = _Files({"/ndownloader/files/38225868": b"not the published archive",
                  "/ndownloader/files/38361230": b"also not it"}, head_ok=True)
    try:
        local = _local(weights.groups()["icnn"], srv.url)  # the real published md5s
        monkeypatch.setattr(weights, "groups", lambda: {"icnn": local})
        rc = weights.main(["--weights-dir", str(tmp_path), "--only", "icnn", "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1
        assert "md5" in err[0] and "49f4d6dbf1024f33149352dfd309dc4d" in err[0] and "not kept" in err[0]
        assert not (tmp_path / "icnn" / "VGG_ILSVRC_19_layers.zip").exists()
        assert not list(tmp_path.rglob("*.part"))
    finally:
        srv.close()


def test_sha256_prefix_is_verified_and_complete_message_printed_once(tmp_path, monkeypatch, capsys):
    import hashlib
    from dataclasses import replace

    from models import weights
    from pipeline.http import RemoteFile

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    a, b = b"alexnet bytes", b"inception bytes"
    srv = _Files({"/models/a.pth": a, "/models/b.pth": b}, head_ok=True)
    try:
        good = [RemoteFile("a.pth", url=srv.url + "/models/a.pth", sha256=hashlib.sha256(a).hexdigest()[:8]),
                RemoteFile("b.pth", url=srv.url + "/models/b.pth", sha256=hashlib.sha256(b).hexdigest())]
        monkeypatch.setattr(weights, "groups", lambda: {"eval": good})
        assert weights.main(["--weights-dir", str(tmp_path), "--only", "eval", "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert out.count("weights complete") == 1
        assert (tmp_path / "a.pth").read_bytes() == a and (tmp_path / "b.pth").read_bytes() == b
        bad = [replace(good[0], key="c.pth", sha256="00000000")]
        monkeypatch.setattr(weights, "groups", lambda: {"eval": bad})
        assert weights.main(["--weights-dir", str(tmp_path), "--only", "eval", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "sha256" in err[0] and "00000000" in err[0]
        assert not (tmp_path / "c.pth").exists()
    finally:
        srv.close()


def test_check_names_every_missing_model(tmp_path, capsys):
    from models import weights

    assert weights.main(["--weights-dir", str(tmp_path), "--check"]) == 2
    out, err = capsys.readouterr()
    assert "imagenet64-iter-1600000-model-ema.th" in out and "clip-vit-large-patch14" in out
    assert "versatile-diffusion" in out and "alexnet-owt-7be5be79.pth" in out
    assert "4 model(s) not loadable" in err


def test_check_loads_models_saved_in_the_expected_layout(tmp_path):
    """Tiny CLIP and Versatile Diffusion saved where [models] expects them load through --check."""
    from models import versatile, weights
    from models.clip import CLIPEmbedder

    CLIPEmbedder.tiny(seed=0).save_pretrained(tmp_path / "clip-vit-large-patch14")
    versatile.save_versatile(versatile.tiny_versatile(seed=0), tmp_path / "versatile-diffusion")
    results = dict(weights.check(tmp_path, only=["clip", "versatile"]))
    assert results["clip"].startswith("ok: text (1, 77, 32), vision 257 tokens")
    assert results["versatile"].startswith("ok: image UNet")
