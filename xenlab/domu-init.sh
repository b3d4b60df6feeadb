#!/bin/busybox sh
# PID 1 in a test domU: mount, load the Xen user-space drivers, run the agent, power off.
# The agent takes its requests from xenstore (tests_xen/domu_agent.py); its output goes to hvc0,
# which xenconsoled logs in dom0 (/var/log/xen/console/guest-NAME.log).
BB=/bin/busybox
$BB mount -t proc proc /proc
$BB mount -t sysfs sys /sys
$BB mount -t devtmpfs dev /dev
$BB mount -t tmpfs tmpfs /tmp
for m in xen-evtchn xen-gntdev xen-gntalloc; do $BB insmod /lib/modules/xen/$m.ko || echo "insmod $m failed"; done
echo "DOMU: up after $($BB cut -d' ' -f1 /proc/uptime) s; $($BB grep MemTotal /proc/meminfo)"
cd /opt && PATH=/usr/bin:/bin PYTHONPATH=/opt PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
  /usr/bin/python3 /opt/agent.py; echo "DOMU: agent exit $?"
$BB sync
$BB poweroff -f
