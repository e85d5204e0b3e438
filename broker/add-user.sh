#!/usr/bin/env bash
# Give a device, a cloud worker, a trainer or a read-only viewer credentials on a Mosquitto broker that
# runs the project's mosquitto.conf, and grant its topics in the ACL file.
#
#   broker/add-user.sh device|worker|trainer|viewer FLEET NAME [PASSWORD|-]
#
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
usage() { echo "usage: $0 device|worker|trainer|viewer FLEET NAME [PASSWORD|-]" >&2; exit 2; }
[ $# -ge 3 ] && [ $# -le 4 ] || usage
role=$1 fleet=$2 name=$3
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
  device) grants="topic write lepton/$fleet/devices/$name/samples
topic write lepton/$fleet/devices/$name/status
topic write lepton/$fleet/devices/$name/telemetry
topic write lepton/$fleet/devices/$name/predictions
topic read lepton/$fleet/devices/$name/acks
topic read lepton/$fleet/models/#
topic write lepton/$fleet/devices/$name/infer
topic read lepton/$fleet/devices/$name/answers" ;;
  worker) grants="topic read lepton/$fleet/devices/+/samples
topic write lepton/$fleet/devices/+/acks
topic read lepton/$fleet/devices/+/status
topic read lepton/$fleet/devices/+/telemetry
topic readwrite lepton/$fleet/models/#
topic write lepton/$fleet/deadletter
topic readwrite lepton/$fleet/workers/#
topic read lepton/$fleet/devices/+/infer
topic write lepton/$fleet/devices/+/answers" ;;
  # The worker's training child (lepton train --publish): publishes models and nothing else.
  trainer) grants="topic readwrite lepton/$fleet/models/#" ;;
  viewer) grants="topic read lepton/$fleet/devices/+/status
topic read lepton/$fleet/devices/+/telemetry
topic read lepton/$fleet/devices/+/predictions
topic read lepton/$fleet/workers/+/status
topic read lepton/$fleet/models/#
topic read lepton/$fleet/deadletter" ;;
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
