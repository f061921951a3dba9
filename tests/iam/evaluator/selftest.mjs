// Checks the simulator against AWS's documented behaviour before its
// verdicts on the shipped policies are trusted, then the shipped policies'
// own guarantees (negative cases that must be denied).
//
//   node selftest.mjs [DEPLOY_DIR]     (default: ../../../deploy)
import { fileURLToPath } from 'node:url'
import { dirname, join } from 'node:path'
import { evaluate, loadPolicies, CONTROLLER_USER, ACCOUNT } from './iam.mjs'

const here = dirname(fileURLToPath(import.meta.url))
const deploy = process.argv[2] ?? join(here, '../../../deploy')
const policies = loadPolicies(deploy)
let failures = 0

async function expect(name, policy, req, want) {
  const { allowed, why } = await evaluate(policy, CONTROLLER_USER, req)
  const ok = allowed === want
  if (!ok) failures++
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${name}: ${allowed ? 'allowed' : 'denied'} (${why})`)
}

const doc = (...Statement) => ({ Version: '2012-10-17', Statement })
const inst = (id = 'i-0123456789abcdef0', region = 'us-east-1') => `arn:aws:ec2:${region}:${ACCOUNT}:instance/${id}`
const req = (action, resource, resource_tags = {}, request_tags = {}, context = {}) => ({ action, resource, resource_tags, request_tags, context })

// 1. aws:ResourceTag with StringEquals (IAM User Guide, "EC2: Start or stop
//    instances based on tags"): only the tagged instance.
const byTag = doc({
  Effect: 'Allow',
  Action: ['ec2:StartInstances', 'ec2:StopInstances'],
  Resource: 'arn:aws:ec2:*:*:instance/*',
  Condition: { StringEquals: { 'aws:ResourceTag/Project': 'DataAnalytics' } },
})
await expect('docs: ResourceTag StringEquals, tagged instance', byTag, req('ec2:StartInstances', inst(), { Project: 'DataAnalytics' }), true)
await expect('docs: ResourceTag StringEquals, untagged instance', byTag, req('ec2:StartInstances', inst()), false)
await expect('docs: ResourceTag StringEquals, other value', byTag, req('ec2:StopInstances', inst(), { Project: 'Other' }), false)
await expect('docs: ResourceTag is case sensitive in value', byTag, req('ec2:StopInstances', inst(), { Project: 'dataanalytics' }), false)
// The service-prefixed key (ec2:ResourceTag) is the same tag.
const byEc2Tag = doc({ Effect: 'Allow', Action: 'ec2:DeregisterImage', Resource: 'arn:aws:ec2:*::image/*', Condition: { StringEquals: { 'ec2:ResourceTag/owner': 'me' } } })
await expect('ec2:ResourceTag, tagged image', byEc2Tag, req('ec2:DeregisterImage', 'arn:aws:ec2:us-east-1::image/ami-1', { owner: 'me' }), true)
await expect('ec2:ResourceTag, untagged image', byEc2Tag, req('ec2:DeregisterImage', 'arn:aws:ec2:us-east-1::image/ami-1'), false)

// 2. Null (IAM User Guide, "Condition operator to check existence of
//    condition keys"): "false" = the key must be present, "true" = absent.
const present = doc({ Effect: 'Allow', Action: 'ec2:TerminateInstances', Resource: '*', Condition: { Null: { 'aws:ResourceTag/dr:site': 'false' } } })
const absent = doc({ Effect: 'Allow', Action: 'ec2:TerminateInstances', Resource: '*', Condition: { Null: { 'aws:ResourceTag/dr:site': 'true' } } })
await expect('docs: Null false, tag present', present, req('ec2:TerminateInstances', inst(), { 'dr:site': 'a' }), true)
await expect('docs: Null false, tag absent', present, req('ec2:TerminateInstances', inst()), false)
await expect('docs: Null true, tag absent', absent, req('ec2:TerminateInstances', inst()), true)
await expect('docs: Null true, tag present', absent, req('ec2:TerminateInstances', inst(), { 'dr:site': 'a' }), false)

// 3. ForAllValues:StringEquals on aws:TagKeys (IAM User Guide, "Controlling
//    access during AWS requests": only the listed keys may be in the
//    request; a request without tags matches too).
const keys = doc({
  Effect: 'Allow',
  Action: 'ec2:CreateTags',
  Resource: '*',
  Condition: { 'ForAllValues:StringEquals': { 'aws:TagKeys': ['environment', 'cost-center'] } },
})
await expect('docs: ForAllValues TagKeys, listed keys', keys, req('ec2:CreateTags', inst(), {}, { environment: 'p', 'cost-center': '1' }), true)
await expect('docs: ForAllValues TagKeys, one listed key', keys, req('ec2:CreateTags', inst(), {}, { environment: 'p' }), true)
await expect('docs: ForAllValues TagKeys, an extra key', keys, req('ec2:CreateTags', inst(), {}, { environment: 'p', Name: 'x' }), false)
await expect('docs: ForAllValues TagKeys, no key at all', keys, req('ec2:CreateTags', inst()), true)
// ForAnyValue for contrast: at least one listed key.
const anyKey = doc({ Effect: 'Allow', Action: 'ec2:CreateTags', Resource: '*', Condition: { 'ForAnyValue:StringEquals': { 'aws:TagKeys': ['environment'] } } })
await expect('docs: ForAnyValue TagKeys, no key at all', anyKey, req('ec2:CreateTags', inst()), false)
// aws:RequestTag with StringEquals; ec2:CreateAction.
const onCreate = doc({
  Effect: 'Allow',
  Action: 'ec2:CreateTags',
  Resource: 'arn:aws:ec2:*:*:instance/*',
  Condition: { StringEquals: { 'ec2:CreateAction': 'RunInstances', 'aws:RequestTag/team': 'a' } },
})
await expect('docs: CreateAction RunInstances with the request tag', onCreate, req('ec2:CreateTags', inst(), {}, { team: 'a' }, { 'ec2:CreateAction': 'RunInstances' }), true)
await expect('docs: CreateTags without CreateAction (tagging later)', onCreate, req('ec2:CreateTags', inst(), {}, { team: 'a' }), false)
await expect('docs: CreateAction with another request tag value', onCreate, req('ec2:CreateTags', inst(), {}, { team: 'b' }, { 'ec2:CreateAction': 'RunInstances' }), false)
// An explicit Deny wins.
await expect('docs: explicit deny wins', doc(...byTag.Statement, { Effect: 'Deny', Action: 'ec2:StartInstances', Resource: '*' }), req('ec2:StartInstances', inst(), { Project: 'DataAnalytics' }), false)

// 4. The ARN formats the recorder produces are the ones the simulator (from
//    the Service Authorization Reference) expects for each action; a wrong
//    one is refused, not silently matched.
const all = doc({ Effect: 'Allow', Action: '*', Resource: '*' })
const arns = [
  ['ec2:StopInstances', inst()],
  ['ec2:DeregisterImage', 'arn:aws:ec2:us-east-1::image/ami-0abc'],
  ['ec2:DeleteSnapshot', 'arn:aws:ec2:us-east-1::snapshot/snap-0abc'],
  ['ec2:DeleteVolume', `arn:aws:ec2:us-east-1:${ACCOUNT}:volume/vol-0abc`],
  ['ec2:AssociateAddress', `arn:aws:ec2:us-east-1:${ACCOUNT}:elastic-ip/eipalloc-0abc`],
  ['ec2:RunInstances', `arn:aws:ec2:us-east-1:${ACCOUNT}:subnet/subnet-0abc`],
  ['ec2:RunInstances', `arn:aws:ec2:us-east-1:${ACCOUNT}:security-group/sg-0abc`],
  ['ec2:CopyImage', 'arn:aws:ec2:us-west-2::image/*'],
  ['route53:ChangeResourceRecordSets', 'arn:aws:route53:::hostedzone/Z123'],
  ['route53:GetChange', 'arn:aws:route53:::change/C123'],
  ['sts:AssumeRole', `arn:aws:iam::${ACCOUNT}:role/dr-controller-site`],
  ['ec2:DescribeInstances', '*'],
]
for (const [action, resource] of arns) await expect(`ARN format for ${action}: ${resource}`, all, req(action, resource), true)
await expect('ARN format: an image ARN for StopInstances is refused', all, req('ec2:StopInstances', 'arn:aws:ec2:us-east-1::image/ami-0abc'), false)
await expect('ARN format: an instance ARN without the account is refused', all, req('ec2:StopInstances', 'arn:aws:ec2:us-east-1::instance/i-0abc'), false)

// 5. The shipped policies: both files the same but for the controller's
//    AssumeRole statement.
const withoutAssume = { ...policies.controller, Statement: policies.controller.Statement.filter((s) => s.Sid !== 'AssumeOnlyTheSiteRoles') }
const same = JSON.stringify(withoutAssume) === JSON.stringify(policies.siteRole)
if (!same) failures++
console.log(`${same ? 'ok  ' : 'FAIL'} iam-site-role-policy.json is iam-controller-policy.json without AssumeOnlyTheSiteRoles`)

// 6. What the shipped policy must allow and deny.
const P = policies.controller
const ours = { 'dr:site': 'site-a', 'dr:operation': 'op-1', 'dr:created-by': 'dr-controller' }
const primary = { 'dr:site': 'site-a' }
const spare = { 'dr:site': 'site-a', 'dr:operation': 'op-2', 'dr:created-by': 'dr-controller', 'dr:role': 'spare' }
const img = 'arn:aws:ec2:us-east-1::image/ami-0abc'
for (const a of ['ec2:StartInstances', 'ec2:StopInstances', 'ec2:TerminateInstances', 'ec2:ModifyInstanceAttribute']) {
  await expect(`shipped: ${a} of a site's adopted primary (dr:site)`, P, req(a, inst(), primary), true)
  await expect(`shipped: ${a} of an instance the controller launched`, P, req(a, inst(), { ...ours, 'dr:role': 'candidate' }), true)
  await expect(`shipped: ${a} of an instance that is not one of our sites' (no dr:site) is DENIED`, P, req(a, inst(), { Name: 'web', 'dr:role': 'candidate' }), false)
  await expect(`shipped: ${a} of an untagged instance is DENIED`, P, req(a, inst()), false)
}
await expect("shipped: StartInstances of a spare", P, req('ec2:StartInstances', inst(), spare), true)
await expect("shipped: DeregisterImage of one of our backups", P, req('ec2:DeregisterImage', img, ours), true)
await expect("shipped: DeregisterImage of an AMI we did not tag is DENIED", P, req('ec2:DeregisterImage', img, { Name: 'golden' }), false)
await expect("shipped: DeregisterImage of an AMI tagged dr:site by someone else (no dr:created-by) is DENIED", P, req('ec2:DeregisterImage', img, { 'dr:site': 'site-a' }), false)
await expect("shipped: DeleteSnapshot of a snapshot we did not tag is DENIED", P, req('ec2:DeleteSnapshot', 'arn:aws:ec2:us-east-1::snapshot/snap-0abc'), false)
await expect('shipped: adoption, CreateTags dr:site on the untagged primary', P, req('ec2:CreateTags', inst(), {}, { 'dr:site': 'site-a' }), true)
await expect('shipped: adoption with another key too is DENIED', P, req('ec2:CreateTags', inst(), {}, { 'dr:site': 'site-a', Name: 'x' }), false)
await expect("shipped: retagging another site's instance dr:site is DENIED", P, req('ec2:CreateTags', inst(), { 'dr:site': 'site-b' }, { 'dr:site': 'site-a' }), false)
await expect('shipped: CreateTags of other keys on an untagged instance is DENIED', P, req('ec2:CreateTags', inst(), {}, { 'dr:role': 'spare' }), false)
await expect('shipped: retag of a taken spare', P, req('ec2:CreateTags', inst(), spare, { 'dr:role': 'candidate', 'dr:operation': 'op-3' }), true)
await expect('shipped: RunInstances from an AMI we did not create is DENIED', P, req('ec2:RunInstances', img, { Name: 'golden' }), false)

console.log(failures === 0 ? 'selftest: all checks passed' : `selftest: ${failures} check(s) FAILED`)
process.exit(failures === 0 ? 0 : 1)
