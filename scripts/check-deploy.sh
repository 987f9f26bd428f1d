#!/usr/bin/env bash
# Checks that the documented deployments match the binaries, without a Docker engine or a
# cluster: `docker-compose config -q` validates compose.yaml; every service command is run
# natively (`--help`, or `gateway -t` on its config); every Kubernetes manifest is validated
# offline with kubernetes-validate (strict), and the gateway ConfigMap's config with `-t`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug}
fail() { echo "check-deploy FAILED: $*" >&2; exit 1; }

python3 -c "import yaml" 2>/dev/null || python3 -m pip install -q pyyaml
docker-compose -f compose.yaml config -q || fail "compose.yaml"
python3 - "$BIN" <<'PY' || fail "compose commands"
import subprocess, sys, yaml
bin_dir = sys.argv[1]
compose = yaml.safe_load(subprocess.run(
    ["docker-compose", "-f", "compose.yaml", "config"], check=True, capture_output=True, text=True).stdout)
ours = {"gateway", "backend", "mock-vendor"}
checked = 0
for name, svc in compose["services"].items():
    cmd = svc.get("command")
    if not cmd or cmd[0] not in ours:
        continue
    argv = [f"{bin_dir}/{cmd[0]}"] + cmd[1:]
    if cmd[0] == "gateway":
        # Map the container path of its config back to the repository file it mounts.
        mounts = {}
        for v in svc.get("volumes", []):
            if isinstance(v, dict):
                mounts[v.get("target")] = v.get("source")
            else:
                src, dst = v.split(":")[:2]
                mounts[dst] = src
        argv = [mounts.get(a, a) for a in argv] + ["-t"]
    elif cmd[0] == "backend" and len(cmd) > 1:
        argv = argv + ["--help"]   # a subcommand (migrate, seed): check it exists
    else:
        argv = argv + ["--help"]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"service {name}: {' '.join(argv)} failed: {r.stderr}")
    checked += 1
    print(f"ok  {name}: {' '.join(cmd)}")
if checked < 6:
    sys.exit(f"only {checked} services checked")
PY

python3 -c "import yaml" 2>/dev/null || python3 -m pip install -q pyyaml
python3 -m kubernetes_validate --version >/dev/null 2>&1 || python3 -m pip install -q kubernetes-validate
manifests=$(ls k8s/*.yaml | grep -v kustomization.yaml)
python3 -m kubernetes_validate --strict -k 1.30.0 $manifests || fail "Kubernetes manifests"
python3 - "$BIN" <<'PY' || fail "k8s gateway ConfigMap"
# Laid out as the pod mounts it: the ConfigMap in live/, the TLS Secret (a certificate made
# here) in tls/ beside it, which the config names by relative paths.
import os, subprocess, sys, tempfile, yaml
for doc in yaml.safe_load_all(open("k8s/gateway.yaml")):
    if doc and doc.get("kind") == "ConfigMap":
        with tempfile.TemporaryDirectory() as d:
            os.makedirs(f"{d}/live")
            os.makedirs(f"{d}/tls")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                            "-nodes", "-days", "2", "-subj", "/CN=gateway.example", "-keyout", f"{d}/tls/tls.key",
                            "-out", f"{d}/tls/tls.crt"], check=True, capture_output=True)
            with open(f"{d}/live/gateway.yaml", "w") as f:
                f.write(doc["data"]["gateway.yaml"])
            subprocess.run([f"{sys.argv[1]}/gateway", "-t", "-c", f"{d}/live/gateway.yaml"], check=True)
PY
echo "check-deploy: OK"
