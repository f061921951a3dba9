// Shared by evaluate.mjs and selftest.mjs: the shipped policies, and one
// IAM authorization evaluated with @cloud-copilot/iam-simulate (which
// implements every IAM condition operator, validates actions, resource
// ARNs against the action's resource types, and context keys).
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { runSimulation } from '@cloud-copilot/iam-simulate'

export const ACCOUNT = '123456789012'
export const CONTROLLER_USER = `arn:aws:iam::${ACCOUNT}:user/dr-controller`

export function loadPolicies(deployDir) {
  const read = (f) => JSON.parse(readFileSync(join(deployDir, f), 'utf8'))
  return { controller: read('iam-controller-policy.json'), siteRole: read('iam-site-role-policy.json') }
}

/** The request context AWS builds for one authorization. */
export function contextOf(req) {
  const ctx = {}
  const service = req.action.split(':')[0]
  for (const [k, v] of Object.entries(req.resource_tags ?? {})) {
    ctx[`aws:ResourceTag/${k}`] = v
    ctx[`${service}:ResourceTag/${k}`] = v
  }
  const requestTags = Object.entries(req.request_tags ?? {})
  for (const [k, v] of requestTags) ctx[`aws:RequestTag/${k}`] = v
  if (requestTags.length > 0) ctx['aws:TagKeys'] = requestTags.map(([k]) => k)
  Object.assign(ctx, req.context ?? {})
  return ctx
}

/**
 * Evaluates `req` ({action, resource, resource_tags, request_tags, context})
 * for `principal` holding `policy`. Returns {allowed, why}.
 */
export async function evaluate(policy, principal, req, account = ACCOUNT) {
  const simulation = {
    request: {
      principal,
      action: req.action,
      resource: { resource: req.resource, accountId: account },
      contextVariables: contextOf(req),
    },
    identityPolicies: [{ name: 'shipped', policy }],
    serviceControlPolicies: [],
    resourceControlPolicies: [],
  }
  const r = await runSimulation(simulation, {})
  if (r.resultType === 'error') {
    return { allowed: false, why: `the simulator refused the request: ${JSON.stringify(r.errors)}` }
  }
  const allowed = r.overallResult === 'Allowed'
  return { allowed, why: allowed ? grantedBy(r) : deniedBecause(r) }
}

function analysis(r) {
  return r.result?.analysis ?? {}
}

function grantedBy(r) {
  const sids = (analysis(r).identityAnalysis?.allowStatements ?? []).map((s) => s.explain?.identifier ?? "?")
  return `allowed by ${sids.join(', ')}`
}

/** Which statements came close (action and resource matched) and why their conditions failed. */
function deniedBecause(r) {
  const id = analysis(r).identityAnalysis ?? {}
  const deny = (id.denyStatements ?? []).map((s) => `explicit Deny ${s.explain?.identifier ?? "?"}`)
  if (deny.length) return deny.join('; ')
  const near = (id.unmatchedStatements ?? []).filter((s) => s.actionMatch && s.resourceMatch)
  if (near.length === 0) {
    const actionOnly = (id.unmatchedStatements ?? []).filter((s) => s.actionMatch)
    if (actionOnly.length === 0) return 'no statement allows this action'
    return `no statement allows this action on this resource (statements for the action: ${actionOnly
      .map((s) => `${s.explain?.identifier} on ${JSON.stringify(s.statement?.Resource)}`)
      .join('; ')})`
  }
  return near
    .map((s) => {
      const failed = (s.explain?.conditions ?? [])
        .filter((c) => !c.matches)
        .map((c) => {
          const got = c.failedBecauseMissing ? 'missing' : JSON.stringify(c.resolvedConditionKeyValue ?? null)
          const want = Array.isArray(c.values) ? c.values.map((v) => v.value) : c.values?.value
          return `${c.operator} ${c.conditionKeyValue} wants ${JSON.stringify(want)}, got ${got}`
        })
      return `${s.explain?.identifier}: ${failed.join(' and ') || 'conditions not met'}`
    })
    .join('; ')
}

/** Policy and principal of a recorded call. */
export function principalOf(record, policies) {
  if (record.role) {
    const name = record.role.split('/').pop()
    return { policy: policies.siteRole, principal: `arn:aws:sts::${record.account}:assumed-role/${name}/dr-controller`, account: record.account }
  }
  return { policy: policies.controller, principal: CONTROLLER_USER, account: record.account ?? ACCOUNT }
}
