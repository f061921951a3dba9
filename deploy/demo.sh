#!/usr/bin/env bash
# The walking skeleton, end to end, on this machine only (loopback):
#   throw-away PKI -> moto's EC2 server -> one instance registered in it ->
#   a simulated services machine (Replicated files, /opt/nomad, fake IMDS,
#   simulated replicatedctl) -> dr-controller -> dr-agent ->
#   `drctl backup <site> --wait` -> `drctl status` / `drctl backups`.
# Exits 0 only if the backup is recorded and its AMI exists in EC2 (moto).
# Everything it starts is stopped on exit. DR_DEMO_KEEP=1 keeps the work dir.
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

say "Building (cargo build --workspace --bins)"
cargo build --workspace --bins --locked --quiet
bin=${CARGO_TARGET_DIR:-$repo/target}/debug
drctl="$bin/drctl"

site=demo-site
say "Creating a throw-away PKI in $work/pki"
"$drctl" pki init --dir "$work/pki" --trust-domain dr.demo --days 1
"$drctl" pki issue controller --dir "$work/pki" --dns localhost --ip 127.0.0.1 --days 1
"$drctl" pki issue site "$site" --dir "$work/pki" --days 1
"$drctl" pki issue operator demo --dir "$work/pki" --days 1

say "Starting moto's EC2 server on loopback"
moto_port=$(free_port)
"$moto_server" -H 127.0.0.1 -p "$moto_port" > "$work/moto.log" 2>&1 &
pids+=($!)
wait_port "$moto_port"
moto=http://127.0.0.1:$moto_port

say "Registering the services machine in EC2 (RunInstances)"
read -r instance private_ip public_ip < <("$python" - "$moto" <<'PY'
import sys, boto3
ec2 = boto3.client("ec2", endpoint_url=sys.argv[1], region_name="us-east-1")
ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
i = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, InstanceType="m5.xlarge")["Instances"][0]
ec2.create_tags(Resources=[i["InstanceId"]], Tags=[{"Key": "Name", "Value": "circleci-services"}])
print(i["InstanceId"], i["PrivateIpAddress"], i.get("PublicIpAddress", "54.10.20.30"))
PY
)
echo "instance $instance, private $private_ip, public $public_ip"

say "Simulating the services machine: Replicated files, /opt/nomad, IMDS, replicatedctl"
root=$work/root
node="ip-${private_ip//./-}.ec2.internal"
mkdir -p "$root/etc/default" "$root/opt/nomad/server/raft" "$root/var/lib/dr-sim"
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
REPLICATED_OPERATOR_OPTS=" -e PUBLIC_ADDRESS=$public_ip -e TAGS=local -e LOG_LEVEL=info -e NODENAME=$node"
CONF
echo raft > "$root/opt/nomad/server/raft/raft.db"
"$bin/dr-sim-imds" --listen 127.0.0.1:0 --instance-id "$instance" --private-ip "$private_ip" --public-ip "$public_ip" > "$work/imds.out" 2> "$work/imds.log" &
pids+=($!)
for _ in $(seq 1 100); do grep -q '^listening on' "$work/imds.out" 2>/dev/null && break; sleep 0.1; done
imds=http://$(sed -n 's/^listening on //p' "$work/imds.out")
echo "fake IMDS at $imds"

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
CONF
RUST_LOG=info,aws=warn "$bin/dr-controller" --config "$work/controller.toml" > "$work/controller.log" 2>&1 &
pids+=($!)
wait_port "$port"

say "Starting dr-agent on the simulated machine"
cat > "$work/agent.toml" <<CONF
site_id = "$site"
controller_url = "https://127.0.0.1:$port"
state_dir = "$work/agent"
root = "$root"

[tls]
ca = "$work/pki/ca.pem"
cert = "$work/pki/site-$site.pem"
key = "$work/pki/site-$site.key"

[imds]
endpoint = "$imds"

[replicated]
replicatedctl = "$bin/dr-sim-replicatedctl"
CONF
DR_SIM_STATE_DIR="$root/var/lib/dr-sim" "$bin/dr-agent" run --config "$work/agent.toml" > "$work/agent.log" 2>&1 &
pids+=($!)

export DRCTL_CONTROLLER=https://127.0.0.1:$port DRCTL_CA=$work/pki/ca.pem
export DRCTL_CERT=$work/pki/operator-demo.pem DRCTL_KEY=$work/pki/operator-demo.key
for _ in $(seq 1 100); do
  "$drctl" status --output json 2>/dev/null | grep -q '"connected":true' && break
  sleep 0.2
done

say "drctl status"
"$drctl" status

say "drctl backup $site --wait"
"$drctl" backup "$site" --wait

say "drctl status"
"$drctl" status

say "drctl backups $site"
"$drctl" backups "$site"

say "Checking EC2: the recorded AMI exists and carries the site's tags"
image=$("$drctl" backups "$site" --output json | "$python" -c 'import json,sys; print(json.load(sys.stdin)["backups"][0]["image_id"])')
"$python" - "$moto" "$image" "$site" <<'PY'
import sys, boto3
ec2 = boto3.client("ec2", endpoint_url=sys.argv[1], region_name="us-east-1")
img = ec2.describe_images(ImageIds=[sys.argv[2]])["Images"][0]
tags = {t["Key"]: t["Value"] for t in img.get("Tags", [])}
assert img["State"] == "available", img["State"]
assert tags.get("dr:site") == sys.argv[3], tags
print(f"{img['ImageId']} is {img['State']} in EC2, tags {tags}")
PY
say "Demo succeeded"
