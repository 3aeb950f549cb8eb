"""A stand-in for PyPI's `curlify` (used by seed 000's client only to print each request as a
curl command), for machines without it."""
import shlex


def to_curl(request):
    parts = ["curl", "-X", request.method]
    for k, v in request.headers.items():
        parts += ["-H", f"{k}: {v}"]
    if request.body:
        body = request.body.decode() if isinstance(request.body, bytes) else request.body
        parts += ["-d", body]
    parts.append(request.url)
    return " ".join(shlex.quote(p) for p in parts)
