"""Writes the fuzz targets' seed inputs: one small image per supported format
(from a test fixture) and a few well-formed gallery forms. The fuzzers grow
the corpus from these; run `make fuzz-seeds` after changing this file."""

import io
import pathlib

from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent
FIXTURE = ROOT.parent / "tests" / "fixtures" / "fmnist" / "tshirt-0.png"
BOUNDARY = "fuzzboundary"  # src/fuzzing.rs FORM_BOUNDARY


def images():
    base = Image.open(FIXTURE).convert("RGB").resize((16, 16))
    out = {}
    for name, fmt, kwargs in [
        ("png", "PNG", {}),
        ("jpeg", "JPEG", {"quality": 80}),
        ("gif", "GIF", {}),
        ("webp", "WEBP", {"lossless": True}),
        ("bmp", "BMP", {}),
        ("tiff", "TIFF", {}),
    ]:
        buf = io.BytesIO()
        base.save(buf, fmt, **kwargs)
        out[name] = buf.getvalue()
    frames = [base.rotate(a) for a in (0, 90, 180)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out["gif-animated"] = buf.getvalue()
    return out


def form(parts):
    body = b""
    for name, value in parts:
        body += f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"".encode()
        if name == "image":
            body += b'; filename="x.png"\r\nContent-Type: image/png'
        body += b"\r\n\r\n" + value + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def main():
    made = images()
    for name, data in made.items():
        (ROOT / "corpus" / "preprocess" / f"seed-{name}").write_bytes(data)
    png = made["png"]
    forms = {
        "one-image": [("image", png)],
        "labelled": [("image", png), ("label", b"tshirt"), ("metadata", b'{"sku": "A1"}')],
        "two-images": [("image", png), ("image", made["jpeg"]), ("label", b"shoe")],
    }
    for name, parts in forms.items():
        (ROOT / "corpus" / "upload_form" / f"seed-{name}").write_bytes(form(parts))


if __name__ == "__main__":
    main()
