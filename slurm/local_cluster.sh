#!/usr/bin/env bash
# A real two-node Slurm cluster on this one host, for the test-suite and CI.
#
#   bash slurm/local_cluster.sh up      install (if missing), configure and start; wait until n1, n2 are usable
#   bash slurm/local_cluster.sh down    stop slurmctld + both slurmds (scontrol shutdown), then munged
#   bash slurm/local_cluster.sh status  sinfo + squeue
#   bash slurm/local_cluster.sh logs    tails of the daemons' logs
#
# Needs root on Debian/Ubuntu (apt). `up` is idempotent: when everything already runs with the same
# slurm.conf it changes nothing and returns in well under a second.
#
# Layout: the host poses as nodes n1 and n2 (NodeAddr 127.0.0.1, slurmd ports 17001/17002, one
# `slurmd -N nX` each, per-node pid/spool/log files via %n); /etc/hosts maps n1, n2 -> 127.0.0.1.
# Partitions: `debug` (default) and `urgent` (same nodes, higher PriorityTier): a job submitted to
# `urgent` preempts `debug` jobs: they get their --signal at once (or SIGTERM to their srun steps if they
# have none) and are requeued after GraceTime=30 s (+ up to ~30 s slurmctld polling), or at once if the job
# runs `scontrol requeue $SLURM_JOB_ID` itself. A preempted job that just exits ends COMPLETED/FAILED.
# No accounting daemon: sacct does not work; finished jobs stay visible to `scontrol show job` for
# MinJobAge seconds.
set -euo pipefail

SLURM_CONF=/etc/slurm/slurm.conf
CTLD_PID=/run/slurmctld.pid
CTLD_LOG=/var/log/slurmctld.log
NODES=(n1 n2)
NODE_RANGE='n[1-2]'
MUNGE_PID=/run/munge/munged.pid
MUNGE_LOG=/var/log/munge/munged.log
PACKAGES=(slurmctld slurmd slurm-client munge)
WAIT_S=${LOCAL_SLURM_WAIT_S:-60}

log() { echo "[local_cluster] $*" >&2; }

need_root() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "[local_cluster] must run as root" >&2
        exit 2
    fi
}

# --- process checks by pid file ---------------------------------------------------------------
# pid_alive FILE NAME: the pid in FILE is a live process whose command name is NAME.
pid_alive() {
    local file=$1 name=$2 pid
    [[ -r $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]
}

slurmd_pid_file() { echo "/run/slurmd-$1.pid"; }

# stop_pid FILE NAME [TIMEOUT]: SIGTERM the process in FILE (if it is NAME), wait, then SIGKILL.
stop_pid() {
    local file=$1 name=$2 timeout=${3:-20} pid i
    pid_alive "$file" "$name" || { rm -f "$file"; return 0; }
    pid=$(tr -dc '0-9' <"$file")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < timeout * 5; i++)); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$file"; return 0; }
        sleep 0.2
    done
    log "$name (pid $pid) ignored SIGTERM for ${timeout}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$file"
}

# --- logs -------------------------------------------------------------------------------------
print_logs() {
    local n=${1:-40} f
    local files=("$CTLD_LOG") node
    for node in "${NODES[@]}"; do files+=("/var/log/slurmd-$node.log"); done
    files+=("$MUNGE_LOG")
    for f in "${files[@]}"; do
        echo "===== tail -n $n $f ====="
        if [[ -r $f ]]; then tail -n "$n" "$f"; else echo "(missing)"; fi
    done
}

die() {
    log "ERROR: $*"
    print_logs 40 >&2
    exit 1
}

# --- install ----------------------------------------------------------------------------------
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    local apt_opts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold --no-install-recommends)
    # Update the package lists only when they are missing or the install fails with the current ones.
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        apt-get update -q || die "apt-get update failed"
    fi
    if ! apt-get install "${apt_opts[@]}" "${missing[@]}"; then
        apt-get update -q || die "apt-get update failed"
        apt-get install "${apt_opts[@]}" "${missing[@]}" || die "apt-get install ${missing[*]} failed"
    fi
}

# --- configuration ----------------------------------------------------------------------------
render_conf() {
    local host cpus mem_kb real_mb
    host=$(hostname -s)
    cpus=$(nproc --all 2>/dev/null || nproc)
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    # slurmd drains a node whose RealMemory exceeds what it measures; leave ~15% (and >= 256 MiB) slack.
    real_mb=$((mem_kb / 1024 * 85 / 100))
    ((real_mb < 256)) && real_mb=256
    cat <<EOF
# Written by crate's slurm/local_cluster.sh: a two-node cluster (n1, n2) on host ${host}.
ClusterName=crate-local
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmctldPidFile=${CTLD_PID}
SlurmctldLogFile=${CTLD_LOG}
SlurmctldDebug=info
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmdLogFile=/var/log/slurmd-%n.log
SlurmdDebug=info
# Requeue / preemption: jobs are requeueable by default; finished jobs stay in scontrol for an hour
# (no accounting, so this is how tests see final states); SIGTERM -> SIGKILL grace of KillWait s.
JobRequeue=1
# A requeued job becomes eligible again cred_expire+1 s after it ends (default 120 s): keep that short.
AuthInfo=cred_expire=10
MinJobAge=3600
KillWait=30
InactiveLimit=0
Waittime=0
SlurmdTimeout=300
SlurmctldTimeout=120
MessageTimeout=30
SchedulerParameters=sched_interval=10
# Preemption (a job submitted to partition urgent preempts debug jobs): with preempt_send_user_signal a
# job's --signal (e.g. B:USR1@60) is sent at once when it is selected; it is requeued when GraceTime runs
# out (or at once if the job runs scontrol requeue itself); one that exits by itself first ends COMPLETED/FAILED.
SlurmctldParameters=preempt_send_user_signal
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=${NODE_RANGE} NodeHostname=${host} NodeAddr=127.0.0.1 Port=17001-17002 CPUs=${cpus} RealMemory=${real_mb} State=UNKNOWN
PartitionName=debug Nodes=${NODE_RANGE} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes=${NODE_RANGE} Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
}

# write_conf: prints "changed" when slurm.conf was (re)written.
write_conf() {
    local new
    new=$(render_conf)
    mkdir -p /etc/slurm
    if [[ -f $SLURM_CONF ]] && [[ "$(cat "$SLURM_CONF")" == "$new" ]]; then
        return 0
    fi
    log "writing $SLURM_CONF"
    printf '%s\n' "$new" >"$SLURM_CONF.tmp"
    chmod 644 "$SLURM_CONF.tmp"
    mv -f "$SLURM_CONF.tmp" "$SLURM_CONF"
    echo changed
}

ensure_hosts() {
    local name host
    host=$(hostname -s)
    # srun / slurmstepd look up this host's own name too; CI containers do not always resolve it.
    if ! getent hosts "$host" >/dev/null 2>&1; then
        log "adding '127.0.0.1 $host' to /etc/hosts"
        printf '127.0.0.1 %s\n' "$host" >>/etc/hosts
    fi
    for name in "${NODES[@]}"; do
        if ! awk -v n="$name" '!/^[[:space:]]*#/ { for (i = 2; i <= NF; i++) if ($i == n) found = 1 } END { exit !found }' /etc/hosts; then
            log "adding '127.0.0.1 $name' to /etc/hosts"
            printf '127.0.0.1 %s\n' "$name" >>/etc/hosts
        fi
    done
}

# --- daemons ----------------------------------------------------------------------------------
start_munge() {
    if pid_alive "$MUNGE_PID" munged && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    log "starting munged"
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (reinstall munge or run mungekey)"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    rm -f "$MUNGE_PID" /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    su -s /bin/sh munge -c /usr/sbin/munged 9>&- || die "munged failed to start"
    local i
    for ((i = 0; i < 50; i++)); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "munge -n | unmunge does not succeed"
}

slurmctld_running() { pid_alive "$CTLD_PID" slurmctld; }
slurmd_running() { pid_alive "$(slurmd_pid_file "$1")" slurmd; }

start_slurm() {
    mkdir -p /var/spool/slurmctld /var/log
    if ! slurmctld_running; then
        log "starting slurmctld"
        /usr/sbin/slurmctld 9>&- || die "slurmctld failed to start"
    fi
    local i
    for ((i = 0; i < 100; i++)); do
        scontrol ping 2>/dev/null | grep -q 'is UP' && break
        sleep 0.2
    done
    scontrol ping 2>/dev/null | grep -q 'is UP' || die "slurmctld does not answer 'scontrol ping'"
    local n
    for n in "${NODES[@]}"; do
        if ! slurmd_running "$n"; then
            log "starting slurmd -N $n"
            mkdir -p "/var/spool/slurmd-$n"
            /usr/sbin/slurmd -N "$n" 9>&- || die "slurmd -N $n failed to start"
        fi
    done
}

stop_slurm() {
    local n i
    if slurmctld_running; then
        log "scontrol shutdown"
        scontrol shutdown >/dev/null 2>&1 || true
        # Wait for the daemons named in the pid files to exit (scontrol shutdown stops all of them).
        for ((i = 0; i < 150; i++)); do
            local alive=0
            slurmctld_running && alive=1
            for n in "${NODES[@]}"; do slurmd_running "$n" && alive=1; done
            ((alive)) || break
            sleep 0.2
        done
    fi
    stop_pid "$CTLD_PID" slurmctld
    for n in "${NODES[@]}"; do stop_pid "$(slurmd_pid_file "$n")" slurmd; done
}

# node_states: "n1 idle" lines, one per node (responding-ness shown by a trailing '*').
node_states() { sinfo -h -N -o '%N %T' 2>/dev/null | sort -u; }

wait_nodes() {
    local deadline=$((SECONDS + WAIT_S)) states resumed_at=-100 bad n st
    while :; do
        states=$(node_states)
        bad=0
        for n in "${NODES[@]}"; do
            st=$(awk -v n="$n" '$1 == n {print $2}' <<<"$states")
            case $st in
                idle | mixed | allocated | completing) ;; # usable (jobs may run on a second `up`)
                *) bad=1 ;;
            esac
        done
        ((bad)) || return 0
        # DOWN / DRAINED nodes whose slurmd responds (no '*') need an explicit resume.
        if grep -Eq '(down|drain|drained|draining|fail)$' <<<"$states" && ((SECONDS - resumed_at >= 5)); then
            log "resuming nodes: $(tr '\n' ' ' <<<"$states")"
            scontrol update nodename="$NODE_RANGE" state=resume >/dev/null 2>&1 || true
            resumed_at=$SECONDS
        fi
        ((SECONDS >= deadline)) && die "nodes not usable after ${WAIT_S}s: $(tr '\n' ' ' <<<"$states")"
        sleep 1
    done
}

# Serialise concurrent `up` / `down` calls (e.g. several pytest-xdist workers). The daemons are started
# with fd 9 closed, or they would hold the lock for as long as they run.
take_lock() {
    exec 9>/run/crate-local-slurm.lock
    flock -w 600 9 || die "could not lock /run/crate-local-slurm.lock"
}

cmd_up() {
    need_root
    take_lock
    install_packages
    ensure_hosts
    local changed
    changed=$(write_conf)
    if [[ $changed == changed ]] && { slurmctld_running || slurmd_running n1 || slurmd_running n2; }; then
        log "slurm.conf changed: restarting the slurm daemons"
        stop_slurm
    fi
    start_munge
    start_slurm
    wait_nodes
    log "up: $(sinfo -h -o '%P %a %D %T %N' | tr '\n' ';')"
}

cmd_down() {
    need_root
    take_lock
    stop_slurm
    if pid_alive "$MUNGE_PID" munged; then log "stopping munged"; fi
    stop_pid "$MUNGE_PID" munged
    log "down"
}

cmd_status() {
    sinfo
    echo
    squeue
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    logs) print_logs "${2:-60}" ;;
    *)
        echo "usage: $0 {up|down|status|logs [N]}" >&2
        exit 2
        ;;
esac
