package io.kstore.baseline;

import com.google.protobuf.InvalidProtocolBufferException;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.concurrent.atomic.AtomicLong;
import kstore.v1.Features.CustomerFeatures;
import org.apache.kafka.common.header.internals.RecordHeaders;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.common.utils.Utils;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.processor.api.RecordMetadata;
import org.apache.kafka.streams.state.KeyValueStore;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Folds order events into {@code kstore.v1.CustomerFeatures} in the key-value store, emits an
 * alert when a customer starts to match the subscription-abuse rule, and sends records that
 * cannot be folded to the dead-letter topic with why and where from, as kstore's ingest does:
 * the same checks in the same order, the same headers. All of it commits in the task's
 * transaction (exactly-once v2).
 */
final class FeaturesProcessor implements Processor<byte[], byte[], byte[], byte[]> {
    private static final Logger LOG = LoggerFactory.getLogger(FeaturesProcessor.class);

    /** The dead-letter headers kstore writes. */
    static final String DLQ_ERROR_HEADER = "kstore.error";

    static final String DLQ_TOPIC_HEADER = "kstore.source.topic";
    static final String DLQ_PARTITION_HEADER = "kstore.source.partition";
    static final String DLQ_OFFSET_HEADER = "kstore.source.offset";
    static final String DLQ_TRUNCATED_HEADER = "kstore.truncated-from";

    /** The name of the rule in alert records. */
    static final String ABUSE_RULE = "free-delivery-address-spread";

    /** Input records that went to the dead-letter topic, over every task of the process. */
    static final AtomicLong DEAD_LETTERS = new AtomicLong();

    /** Input records that arrived on another partition than their key's. */
    static final AtomicLong PARTITION_MISMATCHES = new AtomicLong();

    /**
     * The largest record kstore produces: its default {@code message.max.bytes} (1,000,000)
     * less room for headers and framing (4096).
     */
    static final int MAX_RECORD_BYTES = 1_000_000 - 4096;

    private final Options options;
    private final int partitions;
    private ProcessorContext<byte[], byte[]> context;
    private KeyValueStore<Bytes, byte[]> store;

    FeaturesProcessor(Options options, int partitions) {
        this.options = options;
        this.partitions = partitions;
    }

    /** Why a record cannot be folded: it goes to the dead-letter topic. */
    private static final class BadRecord extends Exception {
        private static final long serialVersionUID = 1L;

        BadRecord(String message) {
            super(message);
        }
    }

    @Override
    public void init(ProcessorContext<byte[], byte[]> context) {
        this.context = context;
        this.store = context.getStateStore(Main.STORE);
    }

    @Override
    public void process(Record<byte[], byte[]> record) {
        RecordMetadata source = context.recordMetadata().orElseThrow();
        try {
            fold(record, source);
        } catch (BadRecord bad) {
            deadLetter(record, source, bad.getMessage());
        }
    }

    private void fold(Record<byte[], byte[]> record, RecordMetadata source) throws BadRecord {
        byte[] key = record.key();
        if (key == null || key.length == 0) {
            throw new BadRecord("record has no key");
        }
        if (key.length > options.maxKeyBytes) {
            throw new BadRecord(
                    "key of " + key.length + " bytes exceeds max-key-bytes " + options.maxKeyBytes);
        }
        int valueLength = record.value() == null ? 0 : record.value().length;
        if (valueLength > options.maxValueBytes) {
            throw new BadRecord(
                    "value of " + valueLength + " bytes exceeds max-value-bytes " + options.maxValueBytes);
        }
        int expected = Utils.toPositive(Utils.murmur2(key)) % partitions;
        if (expected != source.partition()) {
            PARTITION_MISMATCHES.incrementAndGet();
            LOG.warn(
                    "key {} arrived on partition {} (offset {}), but Kafka's partitioner gives {}; its "
                            + "producer does not use the murmur2 partitioner",
                    new String(key, StandardCharsets.UTF_8),
                    source.partition(),
                    source.offset(),
                    expected);
            if (options.partitionMismatchDlq) {
                throw new BadRecord(
                        "key belongs to partition " + expected + ", arrived on partition " + source.partition());
            }
        }

        // The processor proper (kstore's FeaturesProcessor::process).
        if (record.value() == null) {
            throw new BadRecord("malformed record: no value");
        }
        OrderEvent event;
        try {
            event = OrderJson.decode(record.value());
        } catch (OrderJson.DecodeException e) {
            throw new BadRecord("malformed record: not an order event: " + e.getMessage());
        }
        if (!Arrays.equals(OrderJson.utf8(event.customerId()), key)) {
            throw new BadRecord(
                    "malformed record: customer_id " + debugString(event.customerId()) + " differs from the record key");
        }
        Bytes storeKey = Bytes.wrap(key);
        byte[] stored = store.get(storeKey);
        CustomerFeatures current;
        try {
            current = stored == null ? CustomerFeatures.getDefaultInstance() : CustomerFeatures.parseFrom(stored);
        } catch (InvalidProtocolBufferException e) {
            throw new BadRecord("processing failed: stored value: " + e.getMessage());
        }
        boolean wasAbusing = current.getSubscriptionAbuse();
        CustomerFeatures features = FeatureFold.fold(current, event);
        byte[] value = features.toByteArray();

        byte[] alert = null;
        if (features.getSubscriptionAbuse() && !wasAbusing) {
            alert = alertJson(event, features);
        }
        if (key.length + value.length > MAX_RECORD_BYTES) {
            throw new BadRecord(
                    "new state of " + (key.length + value.length) + " bytes is larger than a Kafka record can be");
        }
        if (alert != null && key.length + alert.length > MAX_RECORD_BYTES) {
            throw new BadRecord(
                    "output record of " + (key.length + alert.length) + " bytes is larger than a Kafka record can be");
        }
        store.put(storeKey, value);
        if (alert != null) {
            context.forward(new Record<>(key, alert, record.timestamp()), Main.ALERTS_SINK);
        }
    }

    /** The alert's JSON, byte for byte what kstore's serde_json writes. */
    private static byte[] alertJson(OrderEvent event, CustomerFeatures features) {
        StringBuilder json = new StringBuilder(160);
        json.append("{\"customer_id\":");
        OrderJson.writeString(json, event.customerId());
        json.append(",\"rule\":");
        OrderJson.writeString(json, ABUSE_RULE);
        json.append(",\"order_id\":");
        OrderJson.writeString(json, event.orderId());
        json.append(",\"event_time_ms\":").append(event.eventTimeMs());
        json.append(",\"free_delivery_addresses_24h\":")
                .append(Integer.toUnsignedString(features.getFreeDeliveryAddresses24H()));
        json.append('}');
        return OrderJson.utf8(json.toString());
    }

    /** Sends the input record to the dead-letter topic, with why and where from. */
    private void deadLetter(Record<byte[], byte[]> record, RecordMetadata source, String reason) {
        LOG.warn(
                "record {} [{}] @ {} sent to the dead-letter topic: {}",
                source.topic(),
                source.partition(),
                source.offset(),
                reason);
        RecordHeaders headers = new RecordHeaders();
        headers.add(DLQ_ERROR_HEADER, OrderJson.utf8(reason));
        headers.add(DLQ_TOPIC_HEADER, OrderJson.utf8(source.topic()));
        headers.add(DLQ_PARTITION_HEADER, OrderJson.utf8(Integer.toString(source.partition())));
        headers.add(DLQ_OFFSET_HEADER, OrderJson.utf8(Long.toString(source.offset())));
        // Keep as much of the record as a Kafka record can carry.
        int room = MAX_RECORD_BYTES / 2;
        byte[] key = cut(record.key(), room);
        byte[] value = cut(record.value(), room);
        long original = length(record.key()) + length(record.value());
        long kept = length(key) + length(value);
        if (kept < original) {
            headers.add(DLQ_TRUNCATED_HEADER, OrderJson.utf8(Long.toString(original)));
        }
        DEAD_LETTERS.incrementAndGet();
        context.forward(new Record<>(key, value, record.timestamp(), headers), Main.DLQ_SINK);
    }

    private static byte[] cut(byte[] bytes, int room) {
        return bytes == null || bytes.length <= room ? bytes : Arrays.copyOf(bytes, room);
    }

    private static long length(byte[] bytes) {
        return bytes == null ? 0 : bytes.length;
    }

    /** A string as Rust's {@code {:?}} shows it (quoted, with the common escapes). */
    private static String debugString(String value) {
        StringBuilder out = new StringBuilder("\"");
        value.codePoints()
                .forEach(
                        c -> {
                            switch (c) {
                                case '"' -> out.append("\\\"");
                                case '\\' -> out.append("\\\\");
                                case '\n' -> out.append("\\n");
                                case '\r' -> out.append("\\r");
                                case '\t' -> out.append("\\t");
                                case 0 -> out.append("\\0");
                                default -> {
                                    if (Character.isISOControl(c)) {
                                        out.append(String.format("\\u{%x}", c));
                                    } else {
                                        out.appendCodePoint(c);
                                    }
                                }
                            }
                        });
        return out.append('"').toString();
    }
}
