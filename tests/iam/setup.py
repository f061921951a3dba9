#!/usr/bin/env python3
"""IAM world for tests/tests/iam.rs, on a moto server started by the test.

Creates, while moto does not yet enforce IAM:
  - user `dr-admin` (everything allowed), for the test's own checks;
  - user `dr-controller` holding the shipped controller policy;
  - role `dr-controller-site` with the shipped trust policy (its principal
    set to the `dr-controller` user) and the shipped site-role policy;
  - N instances (the services machines of the sites);
then switches enforcement on (moto's /moto-api/reset-auth, the endpoint
behind INITIAL_NO_AUTH_ACTION_COUNT): from then on every call is checked
against the caller's IAM policies. Prints one JSON object.

moto 5.2.5 evaluates every EC2 action against the resource "*" (it never
passes an ARN for EC2) and evaluates no Condition key but sts:ExternalId.
A statement scoped to `arn:aws:ec2:*::image/*` would therefore never match
there, so the EC2 statements' Resource is widened to "*" (--moto-resources);
Action and Condition are loaded exactly as shipped, and the sts:AssumeRole
statement keeps its role ARN (moto checks it against the role asked for).

  setup.py --endpoint URL --deploy DIR --instances N [--drop ec2:Action]...
"""
import argparse
import json
import urllib.request

import boto3


def load(path, drop):
    doc = json.load(open(path))
    for st in doc["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        actions = [a for a in actions if a not in drop]
        st["Action"] = actions
        if all(a.startswith("ec2:") for a in actions):
            st["Resource"] = "*"
    doc["Statement"] = [st for st in doc["Statement"] if st["Action"]]
    return json.dumps(doc)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--deploy", required=True)
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--drop", action="append", default=[])
    a = p.parse_args()
    kw = dict(endpoint_url=a.endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    iam = boto3.client("iam", **kw)
    ec2 = boto3.client("ec2", **kw)

    def user(name, policy):
        arn = iam.create_user(UserName=name)["User"]["Arn"]
        iam.put_user_policy(UserName=name, PolicyName=name, PolicyDocument=policy)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"arn": arn, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}

    admin = user("dr-admin", json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    controller = user("dr-controller", load(f"{a.deploy}/iam-controller-policy.json", a.drop))

    trust = json.load(open(f"{a.deploy}/iam-site-role-trust.json"))
    for st in trust["Statement"]:
        st["Principal"]["AWS"] = controller["arn"]
    role = iam.create_role(RoleName="dr-controller-site", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    iam.put_role_policy(RoleName="dr-controller-site", PolicyName="dr-controller-site",
                        PolicyDocument=load(f"{a.deploy}/iam-site-role-policy.json", a.drop))

    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instances = []
    for _ in range(a.instances):
        i = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, InstanceType="m5.xlarge")["Instances"][0]
        instances.append(i["InstanceId"])

    req = urllib.request.Request(f"{a.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                 headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req).read()
    print(json.dumps({"admin": admin, "controller": controller, "role_arn": role, "instances": instances}))


if __name__ == "__main__":
    main()
