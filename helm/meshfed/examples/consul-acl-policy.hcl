# The Consul ACL policy for meshfed's token in zone "east" that imports "api"
# from peer "west": what the Consul catalog source needs, and nothing more.
# tests/test_catalog_consul.py creates its tokens from this file (with its own
# zone and import names) and runs the whole Consul suite against a real Consul
# with `default_policy = "deny"`, so these rules are the ones that work.
#
# For another zone, replace "meshfed-east" with "meshfed-<zone>", and write one
# `service` block per import (see the last rule). Then:
#
#   consul acl policy create -name meshfed-east -rules @consul-acl-policy.hcl
#   consul acl token create -policy-name meshfed-east -description "meshfed zone east"
#
# and give meshfed the token's SecretID ([consul] token_file in zone.toml;
# catalog.consul.tokenSecret in the Helm chart).
#
# Consul does not refuse reads a token may not make: it leaves out what the
# token cannot see. meshfed reports such answers (the zone's /readyz turns
# "degraded"), but the catalog it serves meanwhile lacks what was hidden.

# List the services: /v1/catalog/services leaves out every service the token
# cannot read, so the catalog would silently lack them.
service_prefix "" {
  policy = "read"
}

# See every instance: /v1/health/service/<name> leaves out instances on nodes
# the token cannot read, even when it may read the service. Also reading node
# meshfed-east, to find the imports registered there before.
node_prefix "" {
  policy = "read"
}

# Register imports on the zone's synthetic node, meshfed-<zone> (creating it
# and writing its meta needs node:write), and deregister stale ones (node:write
# alone is enough to deregister, so a removed import needs no rule of its own).
node "meshfed-east" {
  policy = "write"
}

# One block per import: registering a service needs service:write on its name,
# <service>-<peer> (<service>-<namespace>-<peer> outside namespace "default").
# `service_prefix "" { policy = "write" }` instead saves a rule per import, as
# consul-k8s catalog sync does, but lets the token register any service and
# obtain Connect certificates for every one.
service "api-west" {
  policy = "write"
}

# Only with `meshfed up --leader-lock meshfed/east/leader` (several controller
# processes of one zone, one leading): each candidate keeps a Consul session
# (created on the agent's node, so session:write on it; `session_prefix`
# because the agent's node name is the deployment's, not meshfed's) and takes
# the key's lock with it.
session_prefix "" {
  policy = "write"
}

key "meshfed/east/leader" {
  policy = "write"
}

# Only with `meshfed up --state-kv meshfed/east/state` (the zone's state kept
# in Consul KV, so that it survives the loss of the pod and its volume): the
# manifest and the pieces under the prefix. The values hold the zone's CA keys
# and API tokens: grant no other token read on this prefix.
key_prefix "meshfed/east/state/" {
  policy = "write"
}
