"""Hostile image URLs and misbehaving origins, each with the outcome the service must give.

`url_cases(canary, origin)`: URLs that point at the `canary` listener (127.0.0.1:port and
[::1]:port) in every spelling, at metadata, private and reserved addresses, through other
schemes, with credentials, overlong, and through redirects from the allowed `origin`
(`origin` serves `/_/redirect?to=URL`, tests/support/origin.py). All must be refused before
any connection.

`response_cases(hostile)`: paths of `HostileOrigin` (tests/integration/hostile/servers.py)
and the reason each must be dead-lettered with.
"""

from __future__ import annotations

from urllib.parse import quote

from tests.corpus import SUGGESTED


def url_cases(canary_port: int, origin: str) -> list[tuple[str, str, str]]:
    """(name, url, expected reason); `origin` is the allowed image origin's host:port."""
    c = canary_port
    origin_port = origin.rsplit(":", 1)[1]
    refused_addresses = {
        "loopback": f"http://127.0.0.1:{c}/x.jpg",
        "loopback-other": f"http://127.0.0.2:{c}/x.jpg",
        "loopback-https": f"https://127.0.0.1:{c}/x.jpg",
        "localhost": f"http://localhost:{c}/x.jpg",
        "localhost-upper-dot": f"http://LOCALHOST.:{c}/x.jpg",
        "localhost-on-origin-port": f"http://localhost:{origin_port}/x.jpg",
        "loopback-other-on-origin-port": f"http://127.0.0.2:{origin_port}/x.jpg",
        "unspecified": f"http://0.0.0.0:{c}/x.jpg",
        "zero": f"http://0:{c}/x.jpg",
        "v6-unspecified": f"http://[::]:{c}/x.jpg",
        "v6-loopback": f"http://[::1]:{c}/x.jpg",
        "v4-mapped-loopback": f"http://[::ffff:127.0.0.1]:{c}/x.jpg",
        "v4-mapped-loopback-hex": f"http://[::ffff:7f00:1]:{c}/x.jpg",
        "v4-compatible-loopback": f"http://[::127.0.0.1]:{c}/x.jpg",
        "nat64-loopback": f"http://[64:ff9b::7f00:1]:{c}/x.jpg",
        "6to4-loopback": f"http://[2002:7f00:1::]:{c}/x.jpg",
        "decimal": f"http://2130706433:{c}/x.jpg",
        "hex": f"http://0x7f000001:{c}/x.jpg",
        "hex-dotted": f"http://0x7f.1:{c}/x.jpg",
        "short-form": f"http://127.1:{c}/x.jpg",
        "trailing-dot": f"http://127.0.0.1.:{c}/x.jpg",
        "ideographic-dots": f"http://127\u30020\u30020\u30021:{c}/x.jpg",
        "metadata": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "metadata-decimal": "http://2852039166/latest/meta-data/",
        "metadata-v6": "http://[fd00:ec2::254]/latest/meta-data/",
        "metadata-v4-mapped": "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "metadata-alibaba": "http://100.100.100.200/latest/meta-data/",
        "link-local": "http://169.254.1.1/x.jpg",
        "cgnat": "http://100.64.0.1/x.jpg",
        "private-10": "http://10.0.0.1/x.jpg",
        "private-172": "http://172.16.0.1/x.jpg",
        "private-192": "http://192.168.0.1/x.jpg",
        "unique-local-v6": "http://[fc00::1]/x.jpg",
        "link-local-v6": "http://[fe80::1]/x.jpg",
        "multicast": "http://224.0.0.1/x.jpg",
        "broadcast-decimal": "http://4294967295/x.jpg",
        "documentation": "http://192.0.2.1/x.jpg",
    }
    invalid = {
        "octal": f"http://0177.0.0.1:{c}/x.jpg",
        "credentials": f"http://user:secret@127.0.0.1:{c}/x.jpg",
        "origin-as-userinfo": f"http://{origin}@127.0.0.1:{c}/x.jpg",
        "backslash": f"http://127.0.0.1:{c}\\@{origin}/x.jpg",
        "zone-id": f"http://[fe80::1%25lo]:{c}/x.jpg",
        "too-big-number": "http://4294967296/x.jpg",
        "encoded-host": f"http://%31%32%37.0.0.1:{c}/x.jpg",
        "enclosed-digits": f"http://\u2460\u2461\u2466.0.0.1:{c}/x.jpg",
        "no-scheme": f"//127.0.0.1:{c}/x.jpg",
        "no-host": "http:///x.jpg",
        "port-out-of-range": "http://127.0.0.1:65536/x.jpg",
        "overlong": f"http://{origin}/{'a' * 3000}.jpg",
        "control-character": f"http://127.0.0.1:{c}/x.jpg\r\nHost: {origin}",
    }
    schemes = {
        "file": "file:///etc/passwd",
        "file-localhost": "file://localhost/etc/passwd",
        "gopher": f"gopher://127.0.0.1:{c}/_GET%20/",
        "ftp": f"ftp://127.0.0.1:{c}/x.jpg",
        "dict": f"dict://127.0.0.1:{c}/info",
        "ldap": f"ldap://127.0.0.1:{c}/",
        "data": "data:image/png;base64,iVBORw0KGgo=",
        "jar": f"jar:http://127.0.0.1:{c}/x.jar!/x.jpg",
    }
    redirects = {
        "to-loopback": (f"http://127.0.0.1:{c}/x.jpg", "address_refused"),
        "to-localhost": (f"http://localhost:{c}/x.jpg", "address_refused"),
        "to-v4-mapped": (f"http://[::ffff:127.0.0.1]:{c}/x.jpg", "address_refused"),
        "to-decimal": (f"http://2130706433:{c}/x.jpg", "address_refused"),
        "to-v6-loopback": (f"http://[::1]:{c}/x.jpg", "address_refused"),
        "to-metadata": ("http://169.254.169.254/latest/meta-data/", "address_refused"),
        "to-file": ("file:///etc/passwd", "scheme_refused"),
        "to-gopher": (f"gopher://127.0.0.1:{c}/_x", "scheme_refused"),
        "to-s3": ("s3://bucket/key.jpg", "scheme_refused"),
        "to-credentials": (f"http://u:p@127.0.0.1:{c}/x.jpg", "url_invalid"),
        # Two hops: the allowed origin redirects to itself, then to the canary.
        "two-hops": (
            f"http://{origin}/_/redirect?to=" + quote(f"http://127.0.0.1:{c}/x.jpg", safe=""),
            "address_refused",
        ),
    }
    cases = [(f"url/{n}", u, "address_refused") for n, u in refused_addresses.items()]
    cases += [(f"url/{n}", u, "url_invalid") for n, u in invalid.items()]
    cases += [(f"url/{n}", u, "scheme_refused") for n, u in schemes.items()]
    cases += [
        (f"redirect/{n}", f"http://{origin}/_/redirect?to={quote(target, safe='')}", reason)
        for n, (target, reason) in redirects.items()
    ]
    return cases


# (name, path on HostileOrigin, expected outcome). "files/..." paths are added by the test.
RESPONSE_PATHS: tuple[tuple[str, str, str], ...] = (
    ("response/endless-jpeg", "endless-jpeg", "too_large"),
    ("response/endless-html", "endless-html", "not_an_image"),
    ("response/gzip-bomb", "gzip-bomb", "not_an_image"),
    ("response/declared-over-cap", "declared-over-cap", "too_large"),
    ("response/short-body", "short-body", "fetch_failed"),
    ("response/drip", "drip", "fetch_timeout"),
    ("response/stall", "stall", "fetch_timeout"),
    ("response/redirect-loop", "loop", "too_many_redirects"),
    ("response/bad-location", "bad-location", "url_invalid"),
    ("response/no-location", "no-location", "http_status"),
    ("response/status-404", "status/404", "http_status"),
    ("response/status-503", "status/503", "http_status"),
)

# (name, content type, what the body is, expected outcome); bodies made by the test.
RESPONSE_FILES: tuple[tuple[str, str, str, str], ...] = (
    ("photo-as-html", "text/html", "jpeg", SUGGESTED),
    ("photo-as-octets", "application/octet-stream", "png", SUGGESTED),
    ("photo-without-type", "", "webp", SUGGESTED),
    ("html-as-jpeg", "image/jpeg", "html", "not_an_image"),
    ("empty", "image/jpeg", "empty", "not_an_image"),
    ("truncated-jpeg", "image/jpeg", "truncated-jpeg", "image_undecodable"),
)
