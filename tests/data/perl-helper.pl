#!/usr/bin/perl
# A stand-in for the Perl dbus-vmstate helper that qemu-server ships
# (src/usr/dbus-vmstate), for mixed-cluster tests: a migration from a node that
# still runs the Perl helper to one that runs this project's helper, and back.
#
#   perl perl-helper.pl VMID QMP_SOCKET
#
# What it reproduces, on the wire and with conntrack(8), as the original does:
# - Net::DBus on the system bus (libdbus honours DBUS_SYSTEM_BUS_ADDRESS);
#   export_service('org.qemu.VMState1'), i.e. RequestName with no flags: it
#   queues behind an existing owner and never replaces one; no per-VM name.
# - /org/qemu/VMState1 with org.qemu.VMState1 (read-only Id = pve-vmstate-VMID,
#   Save() -> ay, Load(ay)) and com.proxmox.VMStateHelper (read-only
#   NumMigratedEntries u, Quit() declared without a reply: a caller waiting for
#   one gets NoReply once the process has left the bus).
# - Save: `conntrack --dump --mark VMID --output save`; each stdout line plus
#   " --mark VMID\n". The 1 MiB check compares length(text so far) +
#   length(line) with 1048576 and so ignores the suffix and the newline: a
#   payload can end up a few bytes over the limit QEMU accepts. Lines after the
#   first that fails the check are dropped (conntrack still runs to its end).
#   NumMigratedEntries comes from conntrack's stderr summary with a one-digit
#   pattern, so it holds the count's last digit only (6,000 -> 0). Any other
#   stderr line is logged as an error. A failed conntrack, or no entries,
#   answers [0]. Otherwise the bytes are unpack('c*', text), signed values as
#   the original hands them to Net::DBus.
# - Load: a payload of at most one byte is nothing. Otherwise pack('c*') under
#   `use warnings`: every byte above 127 prints "Character in 'c' format
#   wrapped in pack" to stderr (the journal on a real host). The text is piped
#   into `conntrack --load-file -`, whose own output goes to the journal too;
#   then one line: restored N bytes, or failed to restore. NumMigratedEntries
#   stays 0 on a destination.
# - QMP, over the socket given as argument (the original derives
#   /var/run/qemu-server/VMID.qmp): greeting, qmp_capabilities, one command,
#   closed after each command. At start, after the name was requested:
#   object-add qom-type=dbus-vmstate id=pve-vmstate addr=<bus address>
#   id-list=pve-vmstate-VMID; if that fails the script dies (exit 255, the
#   object is not there and nothing is retried).
# - Quit (D-Bus method or SIGTERM): object-del pve-vmstate when QEMU still runs
#   (here: its QMP socket accepts a connection; the original checks the VM's
#   pid file), a failure only logged, then the reactor ends and the process
#   exits 0.
#
# What it changes or leaves out:
# - No PVE modules: run_command, the QMP client and syslog are written here.
# - addr: the original hard-codes unix:path=/run/dbus/system_bus_socket; this
#   takes DBUS_SYSTEM_BUS_ADDRESS when set, so a QEMU on a test's private bus
#   reaches it (it then names the same bus the helper is on, as on a host).
# - Log lines go to stderr with syslog priority prefixes (<3> err, <4> warning,
#   <6> info) instead of syslog(3). On a real host the original's
#   syslog('warn', ...) lines are lost (Sys::Syslog has no level "warn"); here
#   they are printed with <4>, so a test can see them and count them apart.
# - No sd_notify(READY=1): a test waits until the Id is queued and the QEMU
#   object exists instead.
# - QMP timeouts: a fixed 10 s per step (the original's are per command).
# - SIGPIPE: like the original, this does not handle it; the tests start it
#   with SIGPIPE ignored, as systemd starts the unit. (Started with SIGPIPE at
#   its default, a Load of a binary payload over 64 KiB kills it whenever
#   conntrack(8) gives up before reading all of its input: the call ends
#   without a reply and the destination QEMU exits.)
use strict;
use warnings;

package PerlHelperStandIn;

use IO::Select;
use IO::Socket::UNIX;
use IPC::Open3;
use JSON::PP;
use Net::DBus;
use Net::DBus::Exporter qw(org.qemu.VMState1);
use Net::DBus::Reactor;
use Socket qw(SOCK_STREAM);
use Symbol qw(gensym);

use base qw(Net::DBus::Object);

use constant {
    SIZE_LIMIT => 1024 * 1024,    # QEMU's limit, inclusive
    QMP_TIMEOUT => 10,
};

sub logline {
    my ($prio, $msg) = @_;
    chomp $msg;
    print STDERR "<$prio>$msg\n";
}

# Plain accessors in place of Class::MethodMaker: Net::DBus::Object reads a
# property by calling the method of the same name.
sub Id {
    my $self = shift;
    $self->{Id} = shift if @_;
    return $self->{Id};
}
dbus_property('Id', 'string', 'read');

sub NumMigratedEntries {
    my $self = shift;
    $self->{NumMigratedEntries} = shift if @_;
    return $self->{NumMigratedEntries};
}
dbus_property('NumMigratedEntries', 'uint32', 'read', 'com.proxmox.VMStateHelper');

sub new {
    my ($class, $service, $vmid, $qmp_path) = @_;
    my $self = $class->SUPER::new($service, '/org/qemu/VMState1');
    $self->{vmid} = $vmid;
    $self->{qmp_path} = $qmp_path;
    $self->Id("pve-vmstate-$vmid");
    $self->NumMigratedEntries(0);
    bless $self, $class;
    return $self;
}

# ------------------------------------------------------------------ QMP

sub qmp_read {
    my ($sock) = @_;
    my $sel = IO::Select->new($sock);
    while (1) {
        die "QMP timeout\n" if !$sel->can_read(QMP_TIMEOUT);
        my $line = <$sock>;
        die "QMP socket closed\n" if !defined($line);
        my $msg = decode_json($line);
        next if exists $msg->{event};
        return $msg;
    }
}

sub qmp_connect {
    my ($path) = @_;
    return IO::Socket::UNIX->new(Type => SOCK_STREAM, Peer => $path);
}

# One session per command, like qemu-server's monitor client.
sub qmp_cmd {
    my ($path, $command, %args) = @_;
    my $sock = qmp_connect($path) or die "unable to connect to QMP socket $path: $!\n";
    my $greeting = qmp_read($sock);
    die "no QMP greeting\n" if !exists $greeting->{QMP};
    for my $msg ({ execute => 'qmp_capabilities' }, { execute => $command, arguments => \%args }) {
        print {$sock} encode_json($msg), "\n";
        $sock->flush();
        my $reply = qmp_read($sock);
        if (my $err = $reply->{error}) {
            close($sock);
            die "QMP $msg->{execute} failed: $err->{class}: $err->{desc}\n";
        }
    }
    close($sock);
}

# ------------------------------------------------------------------ conntrack

# run_command's contract, as the original relies on it: stdout and stderr line
# by line without the newline to callbacks (or passed through when there is
# none), input written to stdin, and a die when the command exits non-zero.
sub run_command {
    my ($cmd, %param) = @_;
    my ($in, $out, $err) = (undef, undef, gensym);
    my $pid = open3($in, $out, $err, @$cmd);
    if (defined($param{input})) {
        print {$in} $param{input};
    }
    close($in);
    my %buf = ($out => '', $err => '');
    my %func = ($out => $param{outfunc}, $err => $param{errfunc});
    my %pass = ($out => \*STDOUT, $err => \*STDERR);
    my $sel = IO::Select->new($out, $err);
    while ($sel->count()) {
        for my $fh ($sel->can_read()) {
            my $n = sysread($fh, my $chunk, 65536);
            if (!$n) {
                $sel->remove($fh);
                next;
            }
            $buf{$fh} .= $chunk;
            while ($buf{$fh} =~ s/^([^\n]*)\n//) {
                my $line = $1;
                if ($func{$fh}) {
                    $func{$fh}->($line);
                } else {
                    print { $pass{$fh} } "$line\n";
                }
            }
        }
    }
    for my $fh ($out, $err) {
        next if $buf{$fh} eq '';
        $func{$fh} ? $func{$fh}->($buf{$fh}) : print { $pass{$fh} } $buf{$fh};
    }
    waitpid($pid, 0);
    my $code = $? >> 8;
    die "command '@$cmd' failed: exit code $code\n" if $?;
}

# ------------------------------------------------------------------ D-Bus

sub Load {
    my ($self, $bytes) = @_;

    my $len = scalar(@$bytes);
    return if $len <= 1;

    # Under `use warnings`, each value above 127 warns here, once per byte.
    my $text = pack('c*', @$bytes);

    eval { run_command(['conntrack', '--load-file', '-'], input => $text) };
    if (my $err = $@) {
        logline(4, "failed to restore conntrack state: $err");
    } else {
        logline(6, "restored $len bytes of conntrack state");
    }
}
dbus_method('Load', [['array', 'byte']], []);

sub Save {
    my ($self) = @_;

    my $vmid = $self->{vmid};
    my $text = '';
    my $truncated = 0;
    eval {
        run_command(
            ['conntrack', '--dump', '--mark', $vmid, '--output', 'save'],
            outfunc => sub {
                my ($line) = @_;
                return if $truncated;
                # The check the original makes: the suffix and newline added
                # below are not counted.
                if ((length($text) + length($line)) > SIZE_LIMIT) {
                    logline(4, 'conntrack state too large, ignoring further entries');
                    $truncated = 1;
                    return;
                }
                $text .= "$line --mark $vmid\n";
            },
            errfunc => sub {
                my ($line) = @_;
                # One digit, as in the original: "6000 flow entries" gives 0.
                if ($line =~ /(\d) flow entries/) {
                    logline(6, "received $1 conntrack entries");
                    $self->NumMigratedEntries($1);
                    return;
                }
                logline(3, $line);
            },
        );
    };
    if (my $err = $@) {
        logline(4, "failed to save conntrack state: $err");
        return [0];
    }

    my @bytes = unpack('c*', $text);
    my $len = scalar(@bytes);
    logline(6, "transferring $len bytes of conntrack state");
    return $len == 0 ? [0] : \@bytes;
}
dbus_method('Save', [], [['array', 'byte']]);

sub Quit {
    my ($self) = @_;

    logline(6, 'shutting down gracefully ..');
    # "Still runs" stands for the original's pid-file check: a QEMU that is
    # gone no longer accepts on its socket.
    if (my $probe = qmp_connect($self->{qmp_path})) {
        close($probe);
        eval { qmp_cmd($self->{qmp_path}, 'object-del', id => 'pve-vmstate') };
        if (my $err = $@) {
            logline(4, "failed to remove object: $err");
        }
    }
    Net::DBus::Reactor->main()->shutdown();
}
dbus_method('Quit', [], [], 'com.proxmox.VMStateHelper', { no_return => 1 });

package main;

my ($vmid, $qmp_path) = @ARGV;
die "usage: $0 VMID QMP_SOCKET\n" if !defined($qmp_path) || $vmid !~ /^\d+$/;
$| = 1;
STDERR->autoflush(1);

my $dbus = Net::DBus->system();
my $service = $dbus->export_service('org.qemu.VMState1');
my $obj = PerlHelperStandIn->new($service, $vmid, $qmp_path);

$SIG{TERM} = sub { $obj->Quit() };

my $addr = $dbus->get_unique_name();
PerlHelperStandIn::logline(6, "pve-vmstate-$vmid listening on $addr");

PerlHelperStandIn::qmp_cmd(
    $qmp_path, 'object-add',
    'qom-type' => 'dbus-vmstate',
    id => 'pve-vmstate',
    addr => $ENV{DBUS_SYSTEM_BUS_ADDRESS} // 'unix:path=/run/dbus/system_bus_socket',
    'id-list' => "pve-vmstate-$vmid",
);

Net::DBus::Reactor->main()->run();
