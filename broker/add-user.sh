#!/usr/bin/env bash
# Give a device, a cloud worker or a read-only viewer credentials on a Mosquitto broker that runs
# the project's mosquitto.conf, and grant its topics in the ACL file.
#
#   broker/add-user.sh device|worker|viewer FLEET NAME [PASSWORD]
#
# Environment: LEPTON_PASSWD_FILE (default /etc/mosquitto/lepton.passwd),
#              LEPTON_ACL_FILE    (default /etc/mosquitto/lepton.acl, start from broker/lepton.acl).
# Prints the broker URL to hand out. Then reload Mosquitto: kill -HUP $(pidof mosquitto)
set -euo pipefail
usage() { echo "usage: $0 device|worker|viewer FLEET NAME [PASSWORD]" >&2; exit 2; }
[ $# -ge 3 ] || usage
role=$1 fleet=$2 name=$3
password=${4:-$(head -c 18 /dev/urandom | base64 | tr -d '/+=')}
passwd_file=${LEPTON_PASSWD_FILE:-/etc/mosquitto/lepton.passwd}
acl_file=${LEPTON_ACL_FILE:-/etc/mosquitto/lepton.acl}
for id in "$fleet" "$name"; do
  [[ $id =~ ^[A-Za-z0-9_-]{1,64}$ ]] || { echo "error: '$id' is not a valid id: use 1-64 of A-Z a-z 0-9 _ -" >&2; exit 2; }
done
case $role in
  # A device writes only its own channels in its own fleet, and reads its acks and its fleet's models.
  device) grants="topic write lepton/$fleet/devices/$name/samples
topic write lepton/$fleet/devices/$name/status
topic write lepton/$fleet/devices/$name/telemetry
topic write lepton/$fleet/devices/$name/predictions
topic read lepton/$fleet/devices/$name/acks
topic read lepton/$fleet/models/#" ;;
  worker) grants="topic read lepton/$fleet/devices/+/samples
topic write lepton/$fleet/devices/+/acks
topic read lepton/$fleet/devices/+/status
topic read lepton/$fleet/devices/+/telemetry
topic readwrite lepton/$fleet/models/#
topic write lepton/$fleet/deadletter
topic readwrite lepton/$fleet/workers/#" ;;
  viewer) grants="topic read lepton/$fleet/devices/+/status
topic read lepton/$fleet/devices/+/telemetry
topic read lepton/$fleet/devices/+/predictions
topic read lepton/$fleet/workers/+/status
topic read lepton/$fleet/models/#
topic read lepton/$fleet/deadletter" ;;
  *) usage ;;
esac
[ -f "$passwd_file" ] || { touch "$passwd_file"; chmod 600 "$passwd_file"; }
mosquitto_passwd -b "$passwd_file" "$name" "$password"
printf '\nuser %s\n%s\n' "$name" "$grants" >> "$acl_file"
echo "mqtt://$name:$password@<broker-host>:1883"
