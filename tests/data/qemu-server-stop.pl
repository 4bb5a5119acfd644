#!/usr/bin/perl
# Stops a VM's helper the way qemu-server does (its QemuMigrate and DBusVMState code),
# with Debian's Net::DBus: walk the queue of org.qemu.VMState1, read each
# owner's Id at the owner's unique name (a call to the well-known name would
# reach only the primary owner, which may be another VM's helper), and for the
# VM's helper read NumMigratedEntries and call Quit (70 s timeout).
#
#   perl qemu-server-stop.pl VMID      prints "UNIQUE-NAME COUNT", exit 0;
#                                      exit 3 when no helper has the VM's Id
use strict;
use warnings;

use Net::DBus;
use Net::DBus::Binding::Message::MethodCall;

my ($vmid) = @ARGV;
die "usage: $0 VMID\n" if !defined($vmid) || $vmid !~ /^\d+$/;

my $bus = Net::DBus->system(private => 1);
my $con = $bus->get_connection();

sub call_owner {
    my ($owner, $interface, $method, $timeout, @args) = @_;
    my $msg = Net::DBus::Binding::Message::MethodCall->new(
        service_name => $owner,
        object_path => '/org/qemu/VMState1',
        interface => $interface,
        method_name => $method,
    );
    my $iter = $msg->iterator(1);
    $iter->append_string($_) for @args;
    my $reply = $con->send_with_reply_and_block($msg, $timeout * 1000);
    return $reply->get_args_list();
}

# With no owner at all the bus driver answers NameHasNoOwner: an empty queue.
my $owners = eval { $bus->get_bus_object()->ListQueuedOwners('org.qemu.VMState1') } // [];
for my $owner (@$owners) {
    my ($id) = eval {
        call_owner($owner, 'org.freedesktop.DBus.Properties', 'Get', 10, 'org.qemu.VMState1', 'Id');
    };
    next if !defined($id) || $id ne "pve-vmstate-$vmid";
    my ($count) = call_owner(
        $owner, 'org.freedesktop.DBus.Properties', 'Get', 10,
        'com.proxmox.VMStateHelper', 'NumMigratedEntries',
    );
    # Like qemu-server, an error here is only reported: the Perl helper's
    # Quit is declared without a reply, so its caller gets NoReply once the
    # helper has left the bus.
    eval { call_owner($owner, 'com.proxmox.VMStateHelper', 'Quit', 70) };
    print STDERR "Quit: $@" if $@;
    print "$owner $count\n";
    exit 0;
}
print STDERR "no helper for VM $vmid\n";
exit 3;
