#!/usr/bin/env bash
# Give a device, a cloud worker, a trainer or a read-only viewer credentials on a Mosquitto broker that
# runs the project's mosquitto.conf, and grant its topics in the ACL file.
#
#   broker/add-user.sh [--prefix P] device|worker|trainer|viewer FLEET NAME [PASSWORD|-]
#
# The grants are on P/FLEET/... (--prefix P, else $LEPTON_PREFIX, else "lepton"), the topic prefix the
# user's programs run with (`--prefix P` / $LEPTON_PREFIX on every lepton command), e.g.
# --prefix acme/site-3/lepton grants a device acme/site-3/lepton/FLEET/devices/NAME/samples.
# PASSWORD "-" reads the password from the first line of stdin; without it a random one is made.
# (A PASSWORD given as an argument is visible to every local user in /proc while this script runs.)
# The password never reaches mosquitto_passwd's command line: it is hashed from a private 0600 file.
# An existing NAME is refused: a new "device" must never inherit a worker's rights by reusing its name.
# mosquitto.conf sets use_username_as_clientid, so every connection needs a user of its own.
#
# Environment: LEPTON_PASSWD_FILE (default /etc/mosquitto/lepton.passwd),
#              LEPTON_ACL_FILE    (default /etc/mosquitto/lepton.acl, start from broker/lepton.acl).
# Prints the broker URL to hand out. Then reload Mosquitto: kill -HUP $(pidof mosquitto)
set -euo pipefail
umask 077
usage() { echo "usage: $0 [--prefix P] device|worker|trainer|viewer FLEET NAME [PASSWORD|-]" >&2; exit 2; }
prefix=${LEPTON_PREFIX:-lepton}
case ${1-} in
  --prefix) [ $# -ge 2 ] || usage; prefix=$2; shift 2 ;;
  --prefix=*) prefix=${1#--prefix=}; shift ;;
esac
[ $# -ge 3 ] && [ $# -le 4 ] || usage
role=$1 fleet=$2 name=$3
# The rules of lepton.protocol.validate_prefix: topic levels, no wildcards, no '$' or '/' at the start,
# no '/' at the end, no whitespace or control characters (the ACL file separates fields with spaces).
if [ -z "$prefix" ] || [[ $prefix == *[+#]* || $prefix == '$'* || $prefix == /* || $prefix == */ ]] \
   || [[ $prefix =~ [[:space:][:cntrl:]] ]]; then
  echo "error: bad --prefix '$prefix': use topic levels joined by '/' without + # or spaces, not starting" \
       "with \$ or /, not ending with /, e.g. --prefix acme/site-3/lepton" >&2
  exit 2
fi
if [ "${4-}" = "-" ]; then
  IFS= read -r password || [ -n "${password-}" ] || { echo "error: no password on stdin" >&2; exit 2; }
else
  password=${4:-$(head -c 18 /dev/urandom | base64 | tr -d '/+=')}
fi
[ -n "$password" ] || { echo "error: empty password" >&2; exit 2; }
[[ $password != *$'\n'* && $password != *$'\r'* ]] || { echo "error: the password holds a line break" >&2; exit 2; }
passwd_file=${LEPTON_PASSWD_FILE:-/etc/mosquitto/lepton.passwd}
acl_file=${LEPTON_ACL_FILE:-/etc/mosquitto/lepton.acl}
for id in "$fleet" "$name"; do
  [[ $id =~ ^[A-Za-z0-9_-]{1,64}$ ]] || { echo "error: '$id' is not a valid id: use 1-64 of A-Z a-z 0-9 _ -" >&2; exit 2; }
done
case $role in
  # A device writes only its own channels in its own fleet, and reads its acks, its answers and its
  # fleet's models: no device reads another's answers or asks the cloud in another's name.
  device) grants="topic write $prefix/$fleet/devices/$name/samples
topic write $prefix/$fleet/devices/$name/status
topic write $prefix/$fleet/devices/$name/telemetry
topic write $prefix/$fleet/devices/$name/predictions
topic read $prefix/$fleet/devices/$name/acks
topic read $prefix/$fleet/models/#
topic write $prefix/$fleet/devices/$name/infer
topic read $prefix/$fleet/devices/$name/answers" ;;
  worker) grants="topic read $prefix/$fleet/devices/+/samples
topic write $prefix/$fleet/devices/+/acks
topic read $prefix/$fleet/devices/+/status
topic read $prefix/$fleet/devices/+/telemetry
topic readwrite $prefix/$fleet/models/#
topic write $prefix/$fleet/deadletter
topic readwrite $prefix/$fleet/workers/#
topic read $prefix/$fleet/devices/+/infer
topic write $prefix/$fleet/devices/+/answers" ;;
  # The worker's training child (lepton train --publish): publishes models and nothing else.
  trainer) grants="topic readwrite $prefix/$fleet/models/#" ;;
  viewer) grants="topic read $prefix/$fleet/devices/+/status
topic read $prefix/$fleet/devices/+/telemetry
topic read $prefix/$fleet/devices/+/predictions
topic read $prefix/$fleet/workers/+/status
topic read $prefix/$fleet/workers/+/telemetry
topic read $prefix/$fleet/models/#
topic read $prefix/$fleet/deadletter" ;;
  *) usage ;;
esac
if [ -f "$passwd_file" ] && grep -q "^$name:" "$passwd_file"; then
  echo "error: user '$name' already exists in $passwd_file; choose another name, or remove it first" \
       "(mosquitto_passwd -D $passwd_file $name, and its 'user $name' block in $acl_file)" >&2
  exit 2
fi
if [ -f "$acl_file" ] && grep -q "^user $name\$" "$acl_file"; then
  echo "error: '$name' already has grants in $acl_file; choose another name, or delete its 'user $name' block" >&2
  exit 2
fi
work=$(mktemp -d)                      # 0700 (umask 077): the plain password lives here for a moment
trap 'rm -rf "$work"' EXIT
printf '%s:%s\n' "$name" "$password" > "$work/plain"
mosquitto_passwd -U "$work/plain" >/dev/null
[ -f "$passwd_file" ] || { touch "$passwd_file"; chmod 600 "$passwd_file"; }
cat "$work/plain" >> "$passwd_file"
printf '\nuser %s\n%s\n' "$name" "$grants" >> "$acl_file"
echo "mqtt://$name:$password@<broker-host>:1883"
