package io.kstore.baseline;

import com.google.protobuf.Any;
import com.google.protobuf.ByteString;
import com.google.protobuf.Message;
import com.google.rpc.ErrorInfo;
import io.grpc.Context;
import io.grpc.Contexts;
import io.grpc.Deadline;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerInterceptor;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.MetadataUtils;
import io.grpc.stub.StreamObserver;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.TimeUnit;
import kstore.v1.QueryGrpc;
import kstore.v1.QueryOuterClass.ErrorReason;
import kstore.v1.QueryOuterClass.GetRequest;
import kstore.v1.QueryOuterClass.GetResponse;
import kstore.v1.QueryOuterClass.Holder;
import kstore.v1.QueryOuterClass.PartitionHolders;
import kstore.v1.QueryOuterClass.ReadMetadata;
import kstore.v1.QueryOuterClass.Role;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.common.utils.Utils;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.KeyQueryMetadata;
import org.apache.kafka.streams.query.KeyQuery;
import org.apache.kafka.streams.query.Position;
import org.apache.kafka.streams.query.QueryResult;
import org.apache.kafka.streams.query.StateQueryRequest;
import org.apache.kafka.streams.query.StateQueryResult;
import org.apache.kafka.streams.state.HostInfo;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * kstore's {@code kstore.v1.Query/Get}, answered the way a Kafka Streams user answers an
 * interactive query: any instance takes the request, finds the key's owner with
 * {@code queryMetadataForKey}, and reads its own store with an IQv2 {@code KeyQuery} for the
 * key's partition if it holds a copy (active or standby), or forwards the Get once to the
 * owner's {@code application.server} (then to a standby's, if the owner cannot be reached).
 * A forwarded Get carries kstore's {@code kstore-forwarded-from} header and is never forwarded
 * again. Errors use kstore's codes and {@code google.rpc.ErrorInfo} reasons. The other Query
 * methods answer UNIMPLEMENTED.
 */
final class QueryService extends QueryGrpc.QueryImplBase {
    private static final Logger LOG = LoggerFactory.getLogger(QueryService.class);

    /** The header kstore marks forwarded reads with; its value names the forwarding node. */
    static final Metadata.Key<String> FORWARDED_FROM_HEADER =
            Metadata.Key.of("kstore-forwarded-from", Metadata.ASCII_STRING_MARSHALLER);

    private static final Context.Key<String> FORWARDED_FROM = Context.key("kstore-forwarded-from");

    /** The type URL kstore answers values with. */
    static final String CUSTOMER_FEATURES_TYPE_URL = "type.googleapis.com/kstore.v1.CustomerFeatures";

    /** The google.rpc.ErrorInfo domain of kstore's errors. */
    static final String ERROR_DOMAIN = "kstore.io";

    /** How many holders a forwarded read tries, as kstore does. */
    private static final int FORWARD_ATTEMPTS = 2;

    /** The deadline of a forwarded read when the caller gave none. */
    private static final long DEFAULT_FORWARD_TIMEOUT_MS = 10_000;

    private final Options options;
    private final int partitions;
    private final InputEnds ends;
    private final Map<String, ManagedChannel> channels = new ConcurrentHashMap<>();
    private volatile KafkaStreams streams;
    private volatile HostInfo self;

    QueryService(Options options, int partitions, InputEnds ends) {
        this.options = options;
        this.partitions = partitions;
        this.ends = ends;
    }

    /** Starts answering from {@code streams}, whose {@code application.server} is {@code self}. */
    void attach(KafkaStreams streams, HostInfo self) {
        this.self = self;
        this.streams = streams;
    }

    /** Closes the channels to other instances. */
    void close() {
        channels.values().forEach(ManagedChannel::shutdownNow);
    }

    /** Puts the forwarded-from header, if any, into the call's context. */
    ServerInterceptor interceptor() {
        return new ServerInterceptor() {
            @Override
            public <Q, R> ServerCall.Listener<Q> interceptCall(
                    ServerCall<Q, R> call, Metadata headers, ServerCallHandler<Q, R> next) {
                Context context = Context.current().withValue(FORWARDED_FROM, headers.get(FORWARDED_FROM_HEADER));
                return Contexts.interceptCall(context, call, headers, next);
            }
        };
    }

    @Override
    public void get(GetRequest request, StreamObserver<GetResponse> observer) {
        GetResponse response;
        try {
            response = answer(request);
        } catch (StatusRuntimeException e) {
            observer.onError(e);
            return;
        } catch (RuntimeException e) {
            LOG.warn("a Get failed", e);
            observer.onError(error(Status.Code.INTERNAL, ErrorReason.STORE_ERROR, "reading failed: " + e, Map.of()));
            return;
        }
        observer.onNext(response);
        observer.onCompleted();
    }

    private GetResponse answer(GetRequest request) {
        if (!request.getStore().equals(Main.STORE)) {
            throw error(
                    Status.Code.INVALID_ARGUMENT,
                    ErrorReason.UNKNOWN_STORE,
                    "no store named \"" + request.getStore() + "\"; this node serves \"" + Main.STORE + "\"",
                    Map.of("store", Main.STORE));
        }
        byte[] key = request.getKey().toByteArray();
        if (key.length == 0) {
            throw error(Status.Code.INVALID_ARGUMENT, ErrorReason.EMPTY_KEY, "the key is empty", Map.of());
        }
        if (key.length > options.maxKeyBytes) {
            throw error(
                    Status.Code.INVALID_ARGUMENT,
                    ErrorReason.KEY_TOO_LARGE,
                    "the key has " + key.length + " bytes; the limit is " + options.maxKeyBytes,
                    Map.of("limit", Integer.toString(options.maxKeyBytes)));
        }
        int expected = Utils.toPositive(Utils.murmur2(key)) % partitions;
        if (request.hasPartition()) {
            long given = Integer.toUnsignedLong(request.getPartition());
            if (given >= partitions) {
                throw error(
                        Status.Code.INVALID_ARGUMENT,
                        ErrorReason.PARTITION_OUT_OF_RANGE,
                        "partition " + given + " is out of range; the store has " + partitions + " partitions",
                        Map.of("partition", Long.toString(given), "partitions", Integer.toString(partitions)));
            }
            if (given != expected) {
                throw error(
                        Status.Code.INVALID_ARGUMENT,
                        ErrorReason.WRONG_PARTITION,
                        "the key belongs to partition " + expected + ", not " + given,
                        Map.of("partition", Integer.toString(expected), "given_partition", Long.toString(given)));
            }
        }

        KafkaStreams streams = this.streams;
        HostInfo self = this.self;
        KeyQueryMetadata owner = null;
        if (streams != null) {
            try {
                owner = streams.queryMetadataForKey(Main.STORE, Bytes.wrap(key), Serdes.Bytes().serializer());
            } catch (RuntimeException e) {
                // Not started yet, or shutting down.
                LOG.debug("no metadata for a key", e);
            }
        }
        if (owner == null || owner == KeyQueryMetadata.NOT_AVAILABLE || owner.activeHost() == null) {
            throw notHosted(expected, null, "the instance is not running or is rebalancing");
        }
        int partition = owner.partition();
        if (self.equals(owner.activeHost())) {
            return readLocal(streams, key, partition, Role.ROLE_ACTIVE, owner);
        }
        if (owner.standbyHosts().contains(self)) {
            return readLocal(streams, key, partition, Role.ROLE_STANDBY, owner);
        }
        if (FORWARDED_FROM.get() != null) {
            throw notHosted(partition, owner, "the read was forwarded here already");
        }
        return forward(request, partition, owner);
    }

    private GetResponse readLocal(
            KafkaStreams streams, byte[] key, int partition, Role role, KeyQueryMetadata owner) {
        StateQueryRequest<byte[]> query =
                StateQueryRequest.inStore(Main.STORE)
                        .withQuery(KeyQuery.<Bytes, byte[]>withKey(Bytes.wrap(key)))
                        .withPartitions(Set.of(partition));
        StateQueryResult<byte[]> result;
        try {
            result = streams.query(query);
        } catch (RuntimeException e) {
            throw notHosted(partition, owner, "the store cannot be queried now: " + e.getMessage());
        }
        QueryResult<byte[]> answer = result.getPartitionResults().get(partition);
        if (answer == null) {
            throw notHosted(partition, owner, "the store has no copy of it now");
        }
        if (answer.isFailure()) {
            switch (answer.getFailureReason()) {
                case NOT_PRESENT, NOT_ACTIVE -> throw notHosted(partition, owner, answer.getFailureMessage());
                default -> throw error(
                        Status.Code.INTERNAL,
                        ErrorReason.STORE_ERROR,
                        "reading partition " + partition + " failed: " + answer.getFailureReason() + ": "
                                + answer.getFailureMessage(),
                        Map.of("partition", Integer.toString(partition)));
            }
        }
        byte[] value = answer.getResult();
        ReadMetadata.Builder read =
                ReadMetadata.newBuilder().setPartition(partition).setNodeId(options.instanceId).setRole(role);
        // Every input record before input_offset is reflected: the store's position is the
        // offset of the last input record it applied. Kafka Streams keeps no changelog
        // position per read, so changelog_offset stays unset.
        Position position = answer.getPosition();
        if (position != null) {
            Long applied = position.getPartitionPositions(options.inputTopic).get(partition);
            if (applied != null) {
                long inputNext = applied + 1;
                read.setInputOffset(inputNext);
                long end = ends.end(partition);
                if (end >= 0) {
                    read.setLag(Math.max(0, end - inputNext));
                }
            }
        }
        GetResponse.Builder response = GetResponse.newBuilder().setFound(value != null).setRead(read);
        if (value != null) {
            response.setMessage(Any.newBuilder()
                    .setTypeUrl(CUSTOMER_FEATURES_TYPE_URL)
                    .setValue(ByteString.copyFrom(value)));
        }
        return response.build();
    }

    /** Forwards the Get to the owner, then to a standby, as kstore forwards to the best holders. */
    private GetResponse forward(GetRequest request, int partition, KeyQueryMetadata owner) {
        List<HostInfo> targets = new ArrayList<>();
        targets.add(owner.activeHost());
        targets.addAll(owner.standbyHosts());
        Deadline deadline = Context.current().getDeadline();
        if (deadline == null) {
            deadline = Deadline.after(DEFAULT_FORWARD_TIMEOUT_MS, TimeUnit.MILLISECONDS);
        }
        int attempts = Math.min(FORWARD_ATTEMPTS, targets.size());
        Metadata headers = new Metadata();
        headers.put(FORWARDED_FROM_HEADER, options.instanceId);
        StatusRuntimeException last = null;
        for (int attempt = 0; attempt < attempts; attempt++) {
            long remaining = deadline.timeRemaining(TimeUnit.MILLISECONDS);
            if (remaining <= 0) {
                break;
            }
            // A holder that stalls must leave time to ask the next one.
            if (attempt + 1 < attempts) {
                remaining /= 2;
            }
            HostInfo target = targets.get(attempt);
            QueryGrpc.QueryBlockingStub stub =
                    QueryGrpc.newBlockingStub(channel(target))
                            .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(headers))
                            .withDeadlineAfter(remaining, TimeUnit.MILLISECONDS);
            try {
                // In the caller's context: a cancelled Get cancels its forwarded call too.
                return stub.get(request);
            } catch (StatusRuntimeException e) {
                Status.Code code = e.getStatus().getCode();
                if (code != Status.Code.UNAVAILABLE
                        && code != Status.Code.DEADLINE_EXCEEDED
                        && code != Status.Code.CANCELLED) {
                    throw e;
                }
                last = e;
                LOG.debug("forwarding to {} failed: {}", address(target), e.getStatus());
            }
        }
        throw notHosted(
                partition,
                owner,
                "no holder answered"
                        + (last == null
                                ? ""
                                : " (" + last.getStatus().getCode() + ": " + last.getStatus().getDescription() + ")"));
    }

    private ManagedChannel channel(HostInfo host) {
        return channels.computeIfAbsent(
                address(host), address -> ManagedChannelBuilder.forTarget(address).usePlaintext().build());
    }

    private static String address(HostInfo host) {
        return host.host() + ":" + host.port();
    }

    private StatusRuntimeException notHosted(int partition, KeyQueryMetadata owner, String why) {
        PartitionHolders.Builder holders = PartitionHolders.newBuilder().setPartition(partition);
        if (owner != null && owner.activeHost() != null) {
            holders.addHolders(holder(owner.activeHost(), Role.ROLE_ACTIVE));
            owner.standbyHosts().forEach(h -> holders.addHolders(holder(h, Role.ROLE_STANDBY)));
        }
        return error(
                Status.Code.UNAVAILABLE,
                ErrorReason.PARTITION_NOT_HOSTED,
                "this node holds no copy of partition " + partition + ": " + why,
                Map.of("partition", Integer.toString(partition)),
                holders.build());
    }

    /** A holder as Kafka Streams knows it: by its application.server, which is also its name. */
    private static Holder holder(HostInfo host, Role role) {
        return Holder.newBuilder().setNodeId(address(host)).setGrpcAddress(address(host)).setRole(role).build();
    }

    /** A status with kstore's ErrorInfo detail (and any further details). */
    static StatusRuntimeException error(
            Status.Code code, ErrorReason reason, String message, Map<String, String> metadata, Message... details) {
        com.google.rpc.Status.Builder status =
                com.google.rpc.Status.newBuilder()
                        .setCode(code.value())
                        .setMessage(message)
                        .addDetails(Any.pack(ErrorInfo.newBuilder()
                                .setReason(reason.name())
                                .setDomain(ERROR_DOMAIN)
                                .putAllMetadata(metadata)
                                .build()));
        for (Message detail : details) {
            status.addDetails(Any.pack(detail));
        }
        return StatusProto.toStatusRuntimeException(status.build());
    }
}
