#!/usr/bin/env bash
# Backup and failover end to end, on this machine only (loopback):
#   throw-away PKI -> moto's EC2 server behind the simulated data plane
#   (dr-sim-dataplane: instances launched from a backup boot a copy of the
#   disk the backup was taken of, with a real dr-agent) -> one services
#   machine with an Elastic IP and a Route 53 record -> dr-controller ->
#   `drctl backup <site> --wait` -> the machine is lost (stopped in EC2 and
#   on its simulated host) -> `drctl failover <site> --plan` ->
#   `drctl failover <site> --wait --yes` (plan, progress, RTO, human actions).
# Exits 0 only if EC2 then shows a new instance launched from the backup's
# AMI holding the Elastic IP, the old one stopped, and the restored
# machine's app started with its new addresses. Everything it starts is
# stopped on exit. DR_DEMO_KEEP=1 keeps the work dir.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
pids=()
work=$(mktemp -d /tmp/dr-demo.XXXXXX)
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${DR_DEMO_KEEP:-0}" = 1 ]; then echo "work dir kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# Nothing may leave loopback: static credentials, no instance metadata.
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true
unset AWS_PROFILE AWS_CONFIG_FILE AWS_SHARED_CREDENTIALS_FILE || true

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 300); do
    (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "port $1 never opened" >&2; return 1
}

say "Installing what the demo needs (moto[server]==5.2.5 in a venv)"
moto_server=$(tests/ensure-moto.sh)
python=$(dirname "$moto_server")/python

# --all-targets: the feature set tests/run.sh builds with, so the two share
# one build cache (a different set recompiles the AWS SDK).
say "Building (cargo build --workspace --all-targets)"
cargo build --workspace --all-targets --locked --quiet
bin=${CARGO_TARGET_DIR:-$repo/target}/debug
drctl="$bin/drctl"

site=demo-site
say "Creating a throw-away PKI in $work/pki"
"$drctl" pki init --dir "$work/pki" --trust-domain dr.demo --days 1
# The controller's intermediate CA: the only CA key on the running machine.
"$drctl" pki intermediate --dir "$work/pki" --out "$work/pki/intermediate" --days 1
"$drctl" pki issue controller --dir "$work/pki/intermediate" --out "$work/pki" --dns localhost --ip 127.0.0.1 --days 1
"$drctl" pki issue site "$site" --dir "$work/pki" --days 1
"$drctl" pki issue operator demo --dir "$work/pki" --days 1

# On AWS, EC2 signs each instance's identity document and the controller
# checks it with AWS's public certificate; here the simulated IMDS signs
# with this throw-away key and the controller is given its certificate.
"$python" - "$work/pki" <<'PY'
import sys, datetime
from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "demo instance identity")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256()))
open(sys.argv[1] + "/aws-iid.key", "wb").write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
open(sys.argv[1] + "/aws-iid.pem", "wb").write(cert.public_bytes(serialization.Encoding.PEM))
PY

say "Starting moto's EC2 server on loopback, and the simulated data plane in front of it"
moto_port=$(free_port)
"$moto_server" -H 127.0.0.1 -p "$moto_port" > "$work/moto.log" 2>&1 &
pids+=($!)
wait_port "$moto_port"
"$bin/dr-sim-dataplane" --listen 127.0.0.1:0 --moto "http://127.0.0.1:$moto_port" --dir "$work/dataplane" \
  --boot-delay 2s --app-secs 1 --iid-key "$work/pki/aws-iid.key" > "$work/dataplane.out" 2> "$work/dataplane.log" &
pids+=($!)
for _ in $(seq 1 100); do grep -q '^listening on' "$work/dataplane.out" 2>/dev/null && break; sleep 0.1; done
# Every EC2 and Route 53 call (the controller's and this script's) goes
# through the data plane.
moto=http://$(sed -n 's/^listening on //p' "$work/dataplane.out")
echo "EC2 (moto behind the data plane) at $moto"

say "Registering the services machine in EC2 (RunInstances), its Elastic IP and DNS zone"
read -r instance private_ip eip allocation zone < <("$python" - "$moto" <<'PY'
import sys, boto3
ec2 = boto3.client("ec2", endpoint_url=sys.argv[1], region_name="us-east-1")
ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
i = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, InstanceType="m5.xlarge")["Instances"][0]
ec2.create_tags(Resources=[i["InstanceId"]], Tags=[{"Key": "Name", "Value": "circleci-services"}])
a = ec2.allocate_address(Domain="vpc")
ec2.associate_address(AllocationId=a["AllocationId"], InstanceId=i["InstanceId"])
r53 = boto3.client("route53", endpoint_url=sys.argv[1], region_name="us-east-1")
z = r53.create_hosted_zone(Name="example.com", CallerReference="dr-demo")["HostedZone"]["Id"].split("/")[-1]
print(i["InstanceId"], i["PrivateIpAddress"], a["PublicIp"], a["AllocationId"], z)
PY
)
echo "instance $instance, private $private_ip, Elastic IP $eip ($allocation), zone $zone"

say "Simulating the CircleCI API and dev-console (build cleanup after a restore)"
# One build running since before the backup (the restore deletes it: its
# builder's state is gone), one started after it (left alone).
"$python" - "$work/builds.json" <<'PY'
import json, sys, datetime
now = datetime.datetime.now(datetime.timezone.utc)
def build(n, start):
    t = start.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"build_url": f"https://circleci.example.com/gh/acme/api/{n}", "build_num": n, "username": "acme", "reponame": "api",
            "vcs_type": "github", "branch": "main", "committer_name": "A. Dev", "lifecycle": "running", "status": "running",
            "outcome": None, "queued_at": t, "start_time": t, "stop_time": None}
json.dump([build(41, now - datetime.timedelta(minutes=20)), build(42, now + datetime.timedelta(minutes=5))], open(sys.argv[1], "w"))
PY
echo "demo-token" > "$work/circleci-token"
chmod 600 "$work/circleci-token"
"$bin/dr-sim-circleci-api" --listen 127.0.0.1:0 --token demo-token --builds "$work/builds.json" > "$work/api.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -q '^listening on' "$work/api.out" 2>/dev/null && break; sleep 0.1; done
api=http://$(sed -n 's/^listening on //p' "$work/api.out" | head -1)
echo "CircleCI API simulator at $api"

say "Starting dr-controller"
port=$(free_port)
cat > "$work/controller.toml" <<CONF
[server]
listen = "127.0.0.1:$port"
heartbeat_interval = "2s"

[tls]
ca = "$work/pki/ca.pem"
cert = "$work/pki/controller.pem"
key = "$work/pki/controller.key"
trust_domain = "dr.demo"

[store]
path = "$work/controller/state.db"

# Agents enrol with their instance's signed identity document and get a
# certificate for their instance from this intermediate; they renew it by
# themselves at half of its life.
[pki]
intermediate_cert = "$work/pki/intermediate/ca.pem"
intermediate_key = "$work/pki/intermediate/ca.key"
instance_identity_certificates = "$work/pki/aws-iid.pem"
account_id = "123456789012"

[aws]
region = "us-east-1"
endpoint_url = "$moto"
max_attempts = 1

[backup]
poll_initial = "1s"
poll_max = "5s"

[[site]]
id = "$site"
instance_id = "$instance"

# The controller's app probe, on loopback (on AWS the site's own URL, by
# default https://<hostname>/health-check): nothing here leaves the machine.
[site.policy]
health_url = "$api/health-check"

[site.dns]
zone_id = "$zone"
name = "circleci.example.com"
ttl = 60
CONF
RUST_LOG=info,aws=warn "$bin/dr-controller" --config "$work/controller.toml" > "$work/controller.log" 2>&1 &
pids+=($!)
wait_port "$port"


say "The services machine's disk: Replicated files, /opt/nomad, the agent and its certificate"
root=$work/disk
node="ip-${private_ip//./-}.ec2.internal"
mkdir -p "$root/etc/default" "$root/opt/nomad/server/raft" "$root/var/lib/dr-sim" "$root/etc/dr-agent" "$root/var/lib/dr-agent"
cat > "$root/etc/default/replicated" <<CONF
RELEASE_CHANNEL=stable
PRIVATE_ADDRESS=$private_ip
SKIP_OPERATOR_INSTALL=0
REPLICATED_OPTS=" -e DAEMON_TOKEN=abc123 -e LOG_LEVEL=info -e NODENAME=$node"
REPLICATED_UI_OPTS=""
CONF
cat > "$root/etc/default/replicated-operator" <<CONF
RELEASE_CHANNEL=stable
DAEMON_ENDPOINT=$private_ip:9879
DAEMON_TOKEN=abc123
DAEMON_HOST=$private_ip
PRIVATE_ADDRESS=$private_ip
REPLICATED_OPERATOR_OPTS=" -e PUBLIC_ADDRESS=$eip -e TAGS=local -e LOG_LEVEL=info -e NODENAME=$node"
CONF
echo raft > "$root/opt/nomad/server/raft/raft.db"
cp "$work/pki/ca.pem" "$root/etc/dr-agent/ca.pem"
cp "$work/pki/site-$site.pem" "$root/etc/dr-agent/agent.pem"
cp "$work/pki/site-$site.key" "$root/etc/dr-agent/agent.key"
# @ROOT@ and @IMDS@ are filled in by the simulated host at every boot (on
# AWS the paths are fixed and IMDS is 169.254.169.254).
cat > "$root/etc/dr-agent/agent.toml.in" <<CONF
site_id = "$site"
controller_url = "https://127.0.0.1:$port"
state_dir = "@ROOT@/var/lib/dr-agent"
root = "@ROOT@"

[tls]
ca = "@ROOT@/etc/dr-agent/ca.pem"
cert = "@ROOT@/etc/dr-agent/agent.pem"
key = "@ROOT@/etc/dr-agent/agent.key"

[imds]
endpoint = "@IMDS@"

[replicated]
replicatedctl = "$bin/dr-sim-replicatedctl"
poll_interval = "500ms"

[circleci]
api_url = "$api"
api_token_file = "$work/circleci-token"
hostname = "circleci.example.com"
dev_console = ["$bin/dr-sim-dev-console", "--deletions", "$work/deleted-builds", "--sessions", "$work/console-sessions"]
# On a real machine the frontend at http://127.0.0.1/health-check (the default).
health_url = "$api/health-check"

[reconnect]
initial = "200ms"
max = "2s"
CONF
dp() { "$python" - "$moto" "$@" <<'PY'
import json, sys, urllib.request
url, method, path = sys.argv[1], sys.argv[2], sys.argv[3]
body = sys.argv[4].encode() if len(sys.argv) > 4 else None
req = urllib.request.Request(url + path, data=body, method=method, headers={"content-type": "application/json"})
print(urllib.request.urlopen(req).read().decode())
PY
}
dp POST /dataplane/adopt "{\"instance_id\": \"$instance\", \"disk\": \"$root\"}" > /dev/null
echo "the simulated host of $instance booted (agent log: $work/dataplane/machines/$instance.log)"

export DRCTL_CONTROLLER=https://127.0.0.1:$port DRCTL_CA=$work/pki/ca.pem
export DRCTL_CERT=$work/pki/operator-demo.pem DRCTL_KEY=$work/pki/operator-demo.key
for _ in $(seq 1 150); do
  "$drctl" status --output json 2>/dev/null | grep -q '"role":"primary"' && break
  sleep 0.2
done

say "drctl status"
"$drctl" status

say "drctl backup $site --wait"
"$drctl" backup "$site" --wait

say "drctl backups $site"
"$drctl" backups "$site"
image=$("$drctl" backups "$site" --output json | "$python" -c 'import json,sys; print(json.load(sys.stdin)["backups"][0]["image_id"])')

say "Losing the services machine: StopInstances in EC2 (its simulated host stops)"
"$python" - "$moto" "$instance" <<'PY'
import sys, boto3
boto3.client("ec2", endpoint_url=sys.argv[1], region_name="us-east-1").stop_instances(InstanceIds=[sys.argv[2]])
PY
sleep 1

say "drctl failover $site --plan (changes nothing)"
"$drctl" failover "$site" --plan

say "drctl failover $site --wait --yes"
"$drctl" failover "$site" --wait --yes

say "drctl status"
"$drctl" status

say "Checking EC2 and the restored machine"
op=$("$drctl" status --output json | "$python" -c 'import json,sys; print(json.load(sys.stdin)["sites"][0]["primary_instance_id"])')
"$python" - "$moto" "$image" "$instance" "$allocation" "$op" "$bin/dr-sim-replicatedctl" <<'PY'
import json, os, subprocess, sys, urllib.request, boto3
url, image, old, allocation, new, ctl = sys.argv[1:7]
ec2 = boto3.client("ec2", endpoint_url=url, region_name="us-east-1")
def inst(i):
    return ec2.describe_instances(InstanceIds=[i])["Reservations"][0]["Instances"][0]
n, o = inst(new), inst(old)
assert new != old, "the primary did not change"
assert n["ImageId"] == image, f"{new} was launched from {n['ImageId']}, not the backup {image}"
assert n["State"]["Name"] == "running", n["State"]
assert o["State"]["Name"] == "stopped", o["State"]
addr = ec2.describe_addresses(AllocationIds=[allocation])["Addresses"][0]
assert addr.get("InstanceId") == new, f"the Elastic IP is on {addr.get('InstanceId')}"
machines = json.load(urllib.request.urlopen(url + "/dataplane/machines"))
disk = next(m["disk"] for m in machines if m["instance_id"] == new)
replicated = open(disk + "/etc/default/replicated").read()
assert f"PRIVATE_ADDRESS={n['PrivateIpAddress']}" in replicated, replicated
status = subprocess.run([ctl, "app", "status"], env={**os.environ, "DR_SIM_STATE_DIR": disk + "/var/lib/dr-sim"},
                        capture_output=True, text=True, check=True).stdout
app = json.loads(status)[0]
assert app["State"] == "started" and not app["IsTransitioning"], app
print(f"{new}: launched from {image}, running, holds Elastic IP {addr['PublicIp']}; {old} stopped")
print(f"restored machine: PRIVATE_ADDRESS={n['PrivateIpAddress']} in its Replicated files, app {app['State']}")
PY
echo "builds deleted on the restored machine: $(tr '\n' ' ' < "$work/deleted-builds")"
grep -q '/41$' "$work/deleted-builds" && ! grep -q '/42$' "$work/deleted-builds"
say "Demo succeeded"
