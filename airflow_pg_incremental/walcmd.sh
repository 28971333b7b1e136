# pgincr's archive_command / restore_command: the calls the resident helpers already answered,
# served without starting Python (see walcmd.py). PostgreSQL runs it as
#
#   exec /bin/sh <package>/walcmd.sh <python> -S <package>/walcmd.py fetch [options] %f %p
#   exec /bin/sh <package>/walcmd.sh <python> -S <package>/walcmd.py push [options] %p
#
# fetch: when the prefetcher has spooled %f (pg_wal/pgincr_fetch/<segment>.<crc32>) and recorded
#   the file as it left it (<segment>.ok: "<ready name> <inode> <size> <mtime> <ctime>", written
#   after the segment was verified whole), and the file is still exactly that (any write to it since
#   changes its ctime, which the kernel sets and nobody can set back), it is renamed to %p and the
#   prefetcher told ("<segment> <pid> taken" in `request`).
# push: when the pusher stored %p already (pg_wal/pgincr_spool/<name>.stored: "<inode> <size>
#   <mtime> <ctime> ...", written only once the object is durably stored) and %p is still that file
#   (the marker stays: the pusher removes it once PostgreSQL marked the file done). While the pusher
#   is storing it (<name>.busy locked), the call waits on that lock with `flock` first.
#
# Anything else (a miss, a mismatch, the first call of a recovery, --spool, a test hook, `stat`
# missing) runs the Python command as given (exec: the same process, so PostgreSQL sees its exit
# status and its signals), which checks the CRC-32, waits, starts helpers and fetches or pushes
# directly. So this file only ever answers "done"; it never says "not archived" nor fails.

stat_key() {  # the file's "<inode> <size> <mtime> <ctime>", as fetchahead/pushahead.stat_key write it
    # called only as $(stat_key F): exec makes stat the command substitution's process (no fork)
    exec stat -c '%i %s %.9Y %.9Z' -- "$1" 2>/dev/null
}

fetch_hit() {  # $1 %f, $2 %p
    [ ${#1} -eq 24 ] || return 1
    case $1 in *[!0-9A-F]*) return 1 ;; esac
    [ -f postmaster.pid ] && { [ -f recovery.signal ] || [ -f standby.signal ]; } || return 1
    case $2 in */*) s=${2%/*}/pgincr_fetch ;; *) s=pgincr_fetch ;; esac
    { read -r r key < "$s/$1.ok"; } 2>/dev/null || return 1
    case $r in "$1".[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]) ;; *) return 1 ;; esac
    [ "$key" = "$(stat_key "$s/$r")" ] || return 1
    mv -f -- "$s/$r" "$2" 2>/dev/null || return 1
    echo "$1 $$ taken" 2>/dev/null > "$s/request"
    return 0
}

push_hit() {  # $1 %p
    n=${1##*/}
    [ ${#n} -eq 24 ] || return 1
    case $n in *[!0-9A-F]*) return 1 ;; esac
    case $1 in */*) s=${1%/*}/pgincr_spool ;; *) s=pgincr_spool ;; esac
    if [ ! -f "$s/$n.stored" ]; then
        # being stored: wait on the pusher's lock of it (released once the marker is written, or
        # when the pusher fails or dies), at most 30 s; then look again
        [ -f "$s/$n.busy" ] && flock -s -w 30 "$s/$n.busy" true 2>/dev/null || return 1
    fi
    { read -r ino size mtime ctime rest < "$s/$n.stored"; } 2>/dev/null || return 1
    [ "$ino $size $mtime $ctime" = "$(stat_key "$1")" ] || return 1
    return 0
}

cmd=
for a; do
    case $a in
        fetch|push) cmd=$a; break ;;
    esac
done
eval "last=\${$#}"
case $cmd in
    fetch)
        eval "name=\${$(($# - 1))}"
        if [ -z "$PGINCR_TEST_FETCH_HOLD" ] && fetch_hit "$name" "$last"; then
            [ -z "$PGINCR_TEST_FETCH_TRACE" ] || echo "hit-sh $name" >> "$PGINCR_TEST_FETCH_TRACE"
            exit 0
        fi ;;
    push)
        case " $* " in *" --spool "*) ;; *)
            if push_hit "$last"; then
                [ -z "$PGINCR_TEST_PUSH_TRACE" ] || echo "hit-sh ${last##*/}" >> "$PGINCR_TEST_PUSH_TRACE"
                exit 0
            fi ;;
        esac ;;
esac
exec "$@"
