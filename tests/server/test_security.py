"""TLS and bearer tokens on a real server; client retries across replicas."""

from __future__ import annotations

import re
import subprocess
import sys

import grpc
import pytest

from gradserve.client import NO_RETRIES, GradientClient, GradserveError, RetryPolicy
from tests.jobs import random_job
from tests.servers import run_server

SIZES = (3, 5, 2)


def job_args(seed=0):
    t = random_job(SIZES, 2, 4, seed=seed)
    params = {k: v.numpy() for k, v in t.items() if k.startswith("layers.")}
    return params, t["inputs"].numpy(), t["targets"].numpy()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A self-signed CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("tls")

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=gradserve test CA",
    )
    for name, san in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "subjectAltName=DNS:client"),
    ):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        (d / f"{name}.ext").write_text(san + "\n")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "1",
            "-extfile",
            f"{name}.ext",
        )
    return d


def test_tls_round_trip_with_client_certificates(certificates):
    d = certificates
    with run_server(
        "--tls-cert",
        str(d / "server.pem"),
        "--tls-key",
        str(d / "server.key"),
        "--tls-client-ca",
        str(d / "ca.pem"),
        secure=True,
    ) as srv:
        with GradientClient(
            srv.address,
            root_certificates=str(d / "ca.pem"),
            client_certificate=str(d / "client.pem"),
            client_key=str(d / "client.key"),
            timeout=30,
        ) as client:
            result = client.compute(*job_args())
            assert result.loss.shape == (2,)
        # Without a client certificate the TLS handshake itself fails.
        with GradientClient(
            srv.address, root_certificates=str(d / "ca.pem"), timeout=5, retry=NO_RETRIES
        ) as client:
            with pytest.raises(GradserveError) as err:
                client.compute(*job_args())
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        # A plaintext client cannot talk to a TLS server.
        with GradientClient(srv.address, timeout=5, retry=NO_RETRIES) as client:
            with pytest.raises(GradserveError):
                client.compute(*job_args())


def test_a_client_certificate_without_its_key_is_refused_not_an_abort(certificates):
    """gRPC's core aborts the whole process (a failed check, SIGABRT) when a channel gets
    a client certificate without its private key: the client refuses it first. In child
    processes, so that a regression ends them rather than the test run."""
    cert, key = str(certificates / "client.pem"), str(certificates / "client.key")
    for options in (f"client_certificate={cert!r}", f"client_key={key!r}"):
        program = (
            "from gradserve.client import GradientClient\n"
            "try:\n"
            f"    GradientClient('127.0.0.1:1', {options}).info()\n"
            "except ValueError as e:\n"
            "    print(e)\n"
        )
        out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "client_certificate and client_key go together" in out.stdout
    for flags in (["--cert", cert], ["--key", key]):
        out = subprocess.run([sys.executable, "-m", "gradserve.client", *flags,
                              "--address", "127.0.0.1:1", "info"],
                             capture_output=True, text=True)  # fmt: skip
        assert out.returncode == 2 and "--cert and --key go together" in out.stderr, out.stderr


@pytest.mark.parametrize(
    "material, message",
    [
        ({"root_certificates": b"not a certificate"}, "root_certificates: no PEM certificate"),
        ({"root_certificates": "client.key"}, r"root_certificates \(.*client.key\): no PEM cert"),
        ({"client_certificate": "client.key", "client_key": "client.key"},
         "client_certificate .*: no PEM certificate"),
        ({"client_certificate": "client.pem", "client_key": "client.pem"},
         "client_key .*: no PEM private key"),
    ],
)  # fmt: skip
def test_tls_material_that_is_no_pem_of_its_kind_is_named(certificates, material, message):
    """gRPC would only fail each handshake (UNAVAILABLE, the reason in its log); no server
    listens at this address."""
    paths = {k: v if isinstance(v, bytes) else str(certificates / v) for k, v in material.items()}
    with pytest.raises(ValueError, match=message):
        GradientClient("127.0.0.1:1", retry=NO_RETRIES, **paths)


GARBLED_CERTIFICATE = "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize("as_bytes", [False, True], ids=["paths", "bytes"])
@pytest.mark.parametrize(
    "files, message",
    [
        # another certificate's key
        (("ca.pem", "client.pem", "server.key"), "client_certificate.* / client_key.*: unusable "
                                                 r"\(KEY_VALUES_MISMATCH\)"),
        (("ca.pem", "client.pem", "encrypted.key"), "client_key.*: unusable .*unencrypted"),
        (("ca.pem", "garbled.pem", "client.key"), "client_certificate.*: unusable"),
        (("garbled.pem", "client.pem", "client.key"), "root_certificates.*: unusable"),
    ],
)  # fmt: skip
def test_client_tls_material_that_does_not_fit_is_refused_before_connecting(
    certificates, files, message, as_bytes
):
    """gRPC took each of these and then failed every handshake with UNAVAILABLE (retried
    as a server that is down), the reason only in its log. Keys given as bytes are checked
    as well as paths (through an in-memory file)."""
    d = certificates
    (d / "garbled.pem").write_text(GARBLED_CERTIFICATE)
    subprocess.run(["openssl", "pkey", "-in", "client.key", "-aes256", "-passout", "pass:x",
                    "-out", "encrypted.key"], cwd=d, check=True, capture_output=True)  # fmt: skip
    names = ("root_certificates", "client_certificate", "client_key")
    material = {
        name: (d / f).read_bytes() if as_bytes else str(d / f)
        for name, f in zip(names, files, strict=True)
    }
    with pytest.raises(ValueError, match=message):
        GradientClient("127.0.0.1:1", retry=NO_RETRIES, **material)
    if not as_bytes:  # the CLI names them by its flags
        flags = [a for f, path in zip(("--ca", "--cert", "--key"), material.values(), strict=True)
                 for a in (f, path)]  # fmt: skip
        out = subprocess.run([sys.executable, "-m", "gradserve.client", *flags,
                              "--address", "127.0.0.1:1", "info"],
                             capture_output=True, text=True)  # fmt: skip
        flag_message = message.replace("root_certificates", "--ca")
        flag_message = flag_message.replace("client_certificate", "--cert")
        flag_message = flag_message.replace("client_key", "--key")
        assert out.returncode == 2, out.stderr
        assert re.search(flag_message, out.stderr), out.stderr
    # The right pair, in either form, and a certificate followed by its chain, are taken.
    right = dict(
        material, client_certificate=str(d / "client.pem"), client_key=str(d / "client.key")
    )
    right["root_certificates"] = str(d / "ca.pem")
    GradientClient("127.0.0.1:1", retry=NO_RETRIES, **right).close()
    chain = (d / "client.pem").read_bytes() + (d / "ca.pem").read_bytes()
    right.update(client_certificate=chain, client_key=(d / "client.key").read_bytes())
    GradientClient("127.0.0.1:1", retry=NO_RETRIES, **right).close()


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text("s3cret-token\n")
    with run_server("--auth-token-file", str(token_file)) as srv:
        yield srv


@pytest.mark.parametrize("token", [None, "wrong-token", "s3cret-token-but-longer", ""])
def test_missing_or_wrong_token_is_unauthenticated(token_server, token):
    with GradientClient(token_server.address, token=token, timeout=10) as client:
        with pytest.raises(GradserveError) as err:
            client.compute(*job_args())
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(GradserveError) as err:
            client.server_info()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_right_token_is_served_and_health_needs_none(token_server):
    with GradientClient(token_server.address, token="s3cret-token", timeout=10) as client:
        assert client.compute(*job_args()).loss.shape == (2,)
        assert client.server_info().stats.completed_jobs >= 1
    with GradientClient(token_server.address, timeout=10) as anonymous:
        assert anonymous.health() == "SERVING"


def test_unauthenticated_job_bytes_are_never_read(token_server):
    with GradientClient(token_server.address, token="s3cret-token") as client:
        before = client.server_info().stats
    with GradientClient(token_server.address, token="nope", timeout=10) as client:
        with pytest.raises(GradserveError):
            client.compute(*job_args())
    with GradientClient(token_server.address, token="s3cret-token") as client:
        after = client.server_info().stats
    # The job never reached the service: no outcome was counted for it.
    assert (after.completed_jobs, after.failed_jobs) == (before.completed_jobs, before.failed_jobs)


def test_cli_passes_the_token(token_server):
    base = [sys.executable, "-m", "gradserve.client", "--address", token_server.address, "info"]
    assert subprocess.run(base, capture_output=True).returncode == 2
    ok = subprocess.run(base[:-1] + ["--token", "s3cret-token", "info"], capture_output=True)
    assert ok.returncode == 0


def test_retries_move_to_a_live_replica(server):
    # The first address refuses connections; retries round-robin onto the live server.
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01)
    with GradientClient(["127.0.0.1:1", server.address], retry=policy, timeout=30) as client:
        for seed in range(4):
            assert client.compute(*job_args(seed)).loss.shape == (2,)
    with GradientClient(["127.0.0.1:1"], retry=NO_RETRIES, timeout=5) as client:
        with pytest.raises(GradserveError) as err:
            client.compute(*job_args())
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_port_in_use_ends_the_start_with_a_message(server):
    """Not a second server sharing the port (gRPC's default SO_REUSEPORT would allow it)."""
    port = server.address.rsplit(":", 1)[1]
    done = subprocess.run(
        [sys.executable, "-m", "gradserve.server", "--port", port],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert f"could not bind 127.0.0.1:{port}" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--auth-token-file", "/nonexistent/token"], "--auth-token-file"),
        (["--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"], "--tls-"),
        (["--tls-cert", __file__, "--tls-key", __file__], "not a PEM"),
        (["--host", "999.1.1.1"], "could not bind"),
    ],
)
def test_unusable_security_files_or_address_end_the_start_with_a_message(flags, named):
    done = subprocess.run(
        [sys.executable, "-m", "gradserve.server", "--port", "0", *flags],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert named in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    "files, named",
    [
        # another certificate's key: gRPC took it and then only failed to bind the port
        (("server.pem", "client.key", None), "KEY_VALUES_MISMATCH"),
        (("client.key", "server.key", None), "--tls-cert .*client.key: not a PEM certificate"),
        (("server.pem", "server.pem", None), "--tls-key .*server.pem: not a PEM private key"),
        (("server.pem", "server.key", "garbled.pem"), "--tls-client-ca .*garbled.pem: unusable"),
    ],
)
def test_tls_files_that_do_not_fit_end_the_start_naming_them(certificates, files, named):
    (certificates / "garbled.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    )
    cert, key, client_ca = files
    flags = ["--tls-cert", str(certificates / cert), "--tls-key", str(certificates / key)]
    if client_ca:
        flags += ["--tls-client-ca", str(certificates / client_ca)]
    done = subprocess.run(
        [sys.executable, "-m", "gradserve.server", "--port", "0", *flags],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert re.search(named, done.stderr) and "could not bind" not in done.stderr, done.stderr


def test_an_ipv6_host_is_served():
    """--host ::1 binds [::1]:PORT (written without brackets, gRPC took it for another
    address and the start failed)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    tensors = random_job([3, 4, 2], 2, 5, seed=7)
    params = {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}
    with run_server("--host", "::1") as server:
        assert server.address.startswith("[::1]:")
        with GradientClient(server.address) as client:
            result = client.compute(params, tensors["inputs"].numpy(), tensors["targets"].numpy())
    assert result.loss.shape == (2,)
