# The Consul ACL policy for the gateway replicas of zone "east" (`meshfed gateway
# --state-kv meshfed/east/state`): read on the keys where the zone's leader
# (`meshfed up --state-kv meshfed/east/state --gateway-feed`) publishes its
# gateway config (`gateway/manifest`, and `gateway/<n>/manifest` for a config
# too large for one value), and nothing else. They hold the gateway's SVID and
# key, not the zone's CA key, which stays under the same prefix in keys this
# token cannot read. tests/test_gateway_replica.py makes its replica's token from
# this file against a real Consul with `default_policy = "deny"`.
#
# For another zone, replace "meshfed/east/state" with the leader's --state-kv
# prefix. Then:
#
#   consul acl policy create -name meshfed-east-gateway -rules @consul-gateway-acl-policy.hcl
#   consul acl token create -policy-name meshfed-east-gateway -description "meshfed zone east, gateways"
#
# and give each replica the token's SecretID (`--consul-token-file`).
key_prefix "meshfed/east/state/gateway/" {
  policy = "read"
}
