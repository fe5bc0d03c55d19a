package io.kstore.baseline;

import io.grpc.Server;
import io.grpc.ServerInterceptors;
import io.grpc.netty.shaded.io.grpc.netty.NettyServerBuilder;
import java.net.InetSocketAddress;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.errors.UnknownTopicOrPartitionException;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse;
import org.apache.kafka.streams.processor.UsePartitionTimeOnInvalidTimestamp;
import org.apache.kafka.streams.state.HostInfo;
import org.apache.kafka.streams.state.Stores;
import org.slf4j.Logger;

/**
 * The Kafka Streams baseline: kstore's built-in fraud-features processor as a Kafka Streams
 * application with interactive queries over kstore's gRPC Query service. Prints
 * {@code grpc listening on HOST:PORT} once gRPC serves and {@code running} once Kafka Streams
 * first reaches RUNNING.
 */
public final class Main {
    /** The store's name, as kstore names its store (the changelog is {@code <app>-features-changelog}). */
    static final String STORE = "features";

    static final String SOURCE = "orders";
    static final String PROCESSOR = "fold";
    static final String DLQ_SINK = "dead-letters";
    static final String ALERTS_SINK = "alerts";

    private static Logger log;

    private Main() {}

    public static void main(String[] args) throws Exception {
        // Kafka's INFO logging is a line per config and rebalance step: warnings and errors only.
        System.setProperty("org.slf4j.simpleLogger.defaultLogLevel", System.getProperty("log.level", "warn"));
        System.setProperty("org.slf4j.simpleLogger.showDateTime", "true");
        System.setProperty("org.slf4j.simpleLogger.logFile", "System.err");
        log = org.slf4j.LoggerFactory.getLogger(Main.class);

        Options options;
        try {
            options = Options.parse(args);
        } catch (IllegalArgumentException e) {
            if (!e.getMessage().isEmpty()) {
                System.err.println("error: " + e.getMessage());
            }
            System.err.print(Options.USAGE);
            System.exit(e.getMessage().isEmpty() ? 0 : 2);
            return;
        }

        Admin admin = Admin.create(Map.of(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, options.bootstrap));
        int partitions = prepareTopics(admin, options);
        InputEnds ends = new InputEnds(admin, options.inputTopic, partitions);

        // gRPC first: with port 0 the port is known only once bound, and application.server
        // must name it.
        QueryService query = new QueryService(options, partitions, ends);
        Server server = NettyServerBuilder.forAddress(new InetSocketAddress(options.grpcHost, options.grpcPort))
                .addService(ServerInterceptors.intercept(query, query.interceptor()))
                .build()
                .start();
        HostInfo self = new HostInfo(options.grpcHost, server.getPort());

        KafkaStreams streams = new KafkaStreams(topology(options, partitions), config(options, self));
        query.attach(streams, self);
        CountDownLatch stopped = new CountDownLatch(1);
        boolean[] announced = {false};
        streams.setStateListener((next, previous) -> {
            log.info("state {} -> {}", previous, next);
            if (next == KafkaStreams.State.RUNNING && !announced[0]) {
                announced[0] = true;
                System.out.println("running");
                System.out.flush();
            }
            if (next == KafkaStreams.State.NOT_RUNNING || next == KafkaStreams.State.ERROR) {
                stopped.countDown();
            }
        });
        streams.setUncaughtExceptionHandler(error -> {
            log.error("a stream thread failed; the instance stops", error);
            return StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
        boolean[] closing = {false};
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            synchronized (closing) {
                closing[0] = true;
            }
            // A static member: closing does not leave the group, so a restart within the
            // session timeout moves no partition.
            streams.close(Duration.ofSeconds(60));
            server.shutdown();
            ends.close();
            query.close();
            admin.close(Duration.ofSeconds(5));
            try {
                server.awaitTermination(5, TimeUnit.SECONDS);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }, "shutdown"));

        System.out.println("grpc listening on " + options.grpcHost + ":" + server.getPort());
        System.out.flush();
        ends.start();
        streams.start();
        stopped.await();
        synchronized (closing) {
            if (closing[0]) {
                return;
            }
        }
        log.error("Kafka Streams stopped in state {}", streams.state());
        System.exit(1);
    }

    /**
     * Waits for the input topic, returns its partition count, and creates the dead-letter and
     * alert topics with as many partitions, as kstore does.
     */
    private static int prepareTopics(Admin admin, Options options) throws Exception {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(60);
        int partitions;
        while (true) {
            try {
                TopicDescription input = admin.describeTopics(List.of(options.inputTopic))
                        .allTopicNames()
                        .get(30, TimeUnit.SECONDS)
                        .get(options.inputTopic);
                partitions = input.partitions().size();
                break;
            } catch (ExecutionException e) {
                if (!(e.getCause() instanceof UnknownTopicOrPartitionException) || System.nanoTime() > deadline) {
                    throw new IllegalStateException("the input topic " + options.inputTopic + " cannot be described", e);
                }
                Thread.sleep(200);
            }
        }
        if (options.partitionsHint > 0 && options.partitionsHint != partitions) {
            throw new IllegalStateException("--partitions-hint " + options.partitionsHint + " but "
                    + options.inputTopic + " has " + partitions + " partitions");
        }
        Optional<Short> replication =
                options.replicationFactor < 0 ? Optional.empty() : Optional.of(options.replicationFactor);
        for (String topic : List.of(options.dlqTopic(), options.alertsTopic())) {
            try {
                admin.createTopics(List.of(new NewTopic(topic, Optional.of(partitions), replication)))
                        .all()
                        .get(30, TimeUnit.SECONDS);
            } catch (ExecutionException e) {
                if (!(e.getCause() instanceof TopicExistsException)) {
                    throw new IllegalStateException("creating topic " + topic, e);
                }
            }
        }
        return partitions;
    }

    /** The processor graph: input → fold (with the store) → dead letters and alerts. */
    static Topology topology(Options options, int partitions) {
        Topology topology = new Topology();
        topology.addSource(SOURCE, new ByteArrayDeserializer(), new ByteArrayDeserializer(), options.inputTopic);
        topology.addProcessor(PROCESSOR, () -> new FeaturesProcessor(options, partitions), SOURCE);
        topology.addStateStore(
                Stores.keyValueStoreBuilder(Stores.persistentKeyValueStore(STORE), Serdes.Bytes(), Serdes.ByteArray())
                        // The record cache: repeated updates of a key between commits reach
                        // RocksDB and the changelog once (as the DSL's stores do by default).
                        .withCachingEnabled(),
                PROCESSOR);
        topology.addSink(DLQ_SINK, options.dlqTopic(), new ByteArraySerializer(), new ByteArraySerializer(), PROCESSOR);
        topology.addSink(
                ALERTS_SINK, options.alertsTopic(), new ByteArraySerializer(), new ByteArraySerializer(), PROCESSOR);
        return topology;
    }

    /** The Kafka Streams configuration; README.md says why each setting is what it is. */
    static Properties config(Options options, HostInfo self) {
        Properties props = new Properties();
        props.put(StreamsConfig.APPLICATION_ID_CONFIG, options.applicationId);
        props.put(StreamsConfig.CLIENT_ID_CONFIG, options.applicationId + "-" + options.instanceId);
        props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, options.bootstrap);
        props.put(StreamsConfig.APPLICATION_SERVER_CONFIG, self.host() + ":" + self.port());
        props.put(StreamsConfig.STATE_DIR_CONFIG, options.stateDir);
        props.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
        props.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, options.commitIntervalMs);
        props.put(StreamsConfig.NUM_STANDBY_REPLICAS_CONFIG, options.standbys);
        props.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, options.threads);
        props.put(StreamsConfig.STATESTORE_CACHE_MAX_BYTES_CONFIG, options.cacheBytes);
        props.put(StreamsConfig.REPLICATION_FACTOR_CONFIG, (int) options.replicationFactor);
        props.put(StreamsConfig.ROCKSDB_CONFIG_SETTER_CLASS_CONFIG, BoundedMemoryRocksDBConfig.class);
        props.put(BoundedMemoryRocksDBConfig.BLOCK_CACHE_BYTES, options.blockCacheBytes);
        props.put(BoundedMemoryRocksDBConfig.WRITE_BUFFER_BYTES, options.writeBufferBytes);
        props.put(StreamsConfig.DEFAULT_TIMESTAMP_EXTRACTOR_CLASS_CONFIG, UsePartitionTimeOnInvalidTimestamp.class);
        // Static membership: each stream thread's consumer joins as <instance-id>-<thread>.
        props.put(ConsumerConfig.GROUP_INSTANCE_ID_CONFIG, options.instanceId);
        if (options.sessionTimeoutMs != null) {
            props.put(StreamsConfig.consumerPrefix(ConsumerConfig.SESSION_TIMEOUT_MS_CONFIG), options.sessionTimeoutMs);
        }
        for (String[] setting : options.extra) {
            props.put(setting[0], setting[1]);
        }
        return props;
    }
}
