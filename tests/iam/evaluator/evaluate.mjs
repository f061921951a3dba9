// Evaluates every AWS call the end-to-end tests recorded (tests/src/iam_record.rs,
// one JSON line per call in $DR_IAM_RECORD_DIR/*.jsonl) under the shipped
// policies: the controller policy, or the site-role policy for calls made
// with credentials from an AssumeRole. Fails on any denial, printing each
// denied call, and when the recordings miss a kind of call the controller's
// workflows make (so it cannot pass by recording nothing). A request whose
// resource tags the recorder could not look up (`resource_tags: null`,
// `tags_lookup_error`) cannot be judged: it is listed and fails the run too.
//
//   node evaluate.mjs RECORD_DIR [DEPLOY_DIR] [--partial]
//
// --partial: the recordings of a subset of the tests; denials only, no
// coverage requirement.
import { readdirSync, readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { dirname, join } from 'node:path'
import { evaluate, loadPolicies, principalOf } from './iam.mjs'

const here = dirname(fileURLToPath(import.meta.url))
const args = process.argv.slice(2).filter((a) => a !== '--partial')
const partial = process.argv.includes('--partial')
const dir = args[0]
if (!dir) {
  console.error('usage: node evaluate.mjs RECORD_DIR [DEPLOY_DIR] [--partial]')
  process.exit(2)
}
const policies = loadPolicies(args[1] ?? join(here, '../../../deploy'))

// The calls of backup, retention, copy, failover, drill, spare, failback,
// both repair rungs and the health monitor (the Ec2 trait's methods and
// Route 53's, as the workflows call them: controller/src/cloud/ec2.rs,
// dns.rs, workflows/). Each must have been recorded at least once.
const isPrimary = (r) => r.resource_tags?.['dr:site'] && r.resource_tags?.['dr:role'] !== 'spare'
const REQUIRED = [
  ['ec2:DescribeInstances', 'agent verification, fence, launch'],
  ['ec2:DescribeInstanceStatus', 'health monitor'],
  ['ec2:DescribeImages', 'backup, copy, retention'],
  ['ec2:DescribeSnapshots', 'backup wait_snapshots'],
  ['ec2:DescribeAddresses', 'failover Elastic IP'],
  ['ec2:CreateImage', 'backup create_image'],
  ['ec2:CreateTags', 'backup tag_snapshots, adoption, spare retag'],
  ['ec2:CopyImage', 'DR copies'],
  ['ec2:DeregisterImage', 'retention'],
  ['ec2:DeleteSnapshot', 'retention'],
  ['ec2:RunInstances', 'failover, drill, spare launch'],
  ['ec2:StopInstances', 'fence, spare park, host restart'],
  ['ec2:StartInstances', 'take_spare, host restart'],
  ['ec2:TerminateInstances', 'release, drill teardown, spare retire'],
  ['ec2:ModifyInstanceAttribute', 'fence = "terminate"'],
  ['ec2:AssociateAddress', 'failover move_eip'],
  ['route53:ChangeResourceRecordSets', 'failover update_dns'],
  ['route53:GetChange', 'failover update_dns'],
].map(([action, why]) => ({ name: action, why, test: (rec, r) => r.action === action }))
REQUIRED.push(
  {
    name: 'ec2:StartInstances of a primary (not a spare)',
    why: 'rung 2, host_restart',
    test: (rec, r) => r.action === 'ec2:StartInstances' && isPrimary(r),
  },
  {
    name: 'ec2:StartInstances of a spare',
    why: 'failover take_spare',
    test: (rec, r) => r.action === 'ec2:StartInstances' && r.resource_tags?.['dr:role'] === 'spare',
  },
  {
    name: 'ec2:CreateTags dr:site on an untagged instance',
    why: 'adoption of an original primary',
    test: (rec, r) =>
      r.action === 'ec2:CreateTags' && r.resource.includes(':instance/') && Object.keys(r.request_tags ?? {}).join() === 'dr:site',
  },
  {
    name: 'ec2:CreateTags with ec2:CreateAction',
    why: 'tag-on-create of CreateImage, CopyImage, RunInstances',
    test: (rec, r) => r.action === 'ec2:CreateTags' && r.context?.['ec2:CreateAction'],
  },
)

// Preflight's stand-ins for resources that do not exist yet: AWS answers
// "not found" for them, whatever the policy.
const STAND_IN = /^(ami|snap)-0{17}$/
const standIn = (r) => STAND_IN.test(r.resource.split('/').pop())

const files = readdirSync(dir).filter((f) => f.endsWith('.jsonl'))
let calls = 0
const denied = []
const unjudged = []
const seen = new Map(REQUIRED.map((q) => [q.name, 0]))
const perAction = new Map()
for (const file of files) {
  const lines = readFileSync(join(dir, file), 'utf8').split('\n').filter((l) => l.trim())
  for (const line of lines) {
    let rec
    try {
      rec = JSON.parse(line)
    } catch (e) {
      console.error(`${file}: not JSON (${e.message}): ${line.slice(0, 200)}`)
      process.exitCode = 1
      continue
    }
    calls++
    perAction.set(rec.action, (perAction.get(rec.action) ?? 0) + 1)
    const { policy, principal, account } = principalOf(rec, policies)
    for (const r of rec.requests) {
      if (rec.dry_run && standIn(r)) continue
      for (const q of REQUIRED) if (q.test(rec, r)) seen.set(q.name, seen.get(q.name) + 1)
      if (r.resource_tags === null) {
        unjudged.push({ file, rec, r })
        continue
      }
      const { allowed, why } = await evaluate(policy, principal, r, account)
      if (!allowed) denied.push({ file, rec, r, principal, why })
    }
  }
}

console.log(`IAM evaluation: ${calls} recorded calls in ${files.length} file(s) under ${dir}`)
for (const [action, n] of [...perAction].sort()) console.log(`  ${String(n).padStart(6)} ${action}`)
for (const d of denied) {
  console.log(
    `DENIED ${d.r.action} on ${d.r.resource} (call ${d.rec.action}${d.rec.dry_run ? ' DryRun' : ''} in ${d.rec.region}, as ${d.principal}, HTTP ${d.rec.status} from moto, recorded in ${d.file})\n` +
      `  resource tags: ${JSON.stringify(d.r.resource_tags)}\n` +
      `  request tags:  ${JSON.stringify(d.r.request_tags)}${Object.keys(d.r.context ?? {}).length ? `  context: ${JSON.stringify(d.r.context)}` : ''}\n` +
      `  why: ${d.why}`,
  )
}
for (const u of unjudged) {
  console.log(
    `NOT JUDGED ${u.r.action} on ${u.r.resource} (call ${u.rec.action} in ${u.rec.region}, recorded in ${u.file}): ` +
      `its tags could not be looked up: ${u.r.tags_lookup_error ?? 'no reason recorded'}`,
  )
}
const missing = partial ? [] : REQUIRED.filter((q) => seen.get(q.name) === 0)
for (const q of missing) console.log(`NOT COVERED ${q.name} (${q.why}): no recorded call made it`)
console.log(
  `IAM evaluation: ${denied.length} denied, ${unjudged.length} not judged, ${missing.length} kind(s) of call not covered`,
)
if ((calls === 0 && !partial) || denied.length > 0 || unjudged.length > 0 || missing.length > 0) process.exitCode = 1
